"""`python -m llmtrain.generate` = `llmtrain-generate` (see llmtrain.generation.cli)."""

from llmtrain.generation.cli import main

if __name__ == "__main__":
    main()
