"""The bad-input corpus of issue 8: ``generate.build_corpus(root)`` writes the files (nothing binary is committed),
``cases.CASES`` says, per case, the command line, the exit code and a fragment of the one-line message.
``tests/test_bad_inputs.py`` runs them; ``python -m tests.bad_inputs.generate DIR`` writes them to look at."""
