# Paper-layout tables, figures and the kernel diagnostics (owned by the tables work; see issue 5).
