"""Records to files: the record schema (:mod:`.records`), the output directory and its checks
(:mod:`.directory`, :mod:`.lock`), the writer and progress bar that take records as they finish
(:mod:`.writer`, :mod:`.progress`), and what reads a finished directory (:mod:`.merge`, :mod:`.export`)."""
