"""The built-in world: procedural scenes, vocabulary, tiny SD-architecture model and evaluator."""
