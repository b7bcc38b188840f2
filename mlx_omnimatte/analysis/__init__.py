"""Which DiT blocks attend to an object's effects: the scores (`scores`),
their run over synthetic clips (`run`) and the report (`report`)."""
