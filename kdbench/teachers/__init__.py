"""Teachers that kdbench did not train: imported checkpoints (:mod:`.imported`) and the papers'
released teachers (:mod:`.released`)."""

#: the folder of the raw released teacher files (``kdbench fetch-teachers --dir``)
TEACHERS_DIR = "teachers"
