"""The coordinator: a Flower ServerApp that holds only an evaluation context."""
