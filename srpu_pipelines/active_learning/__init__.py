"""Active learning: score the pool (uncertainty, embeddings), select what a person labels
next, write round folders and take corrected masks back."""

from srpu_pipelines.config import SELECTION_STRATEGIES

# arms of the simulation benchmark `srpu bench al`: the registered selection strategies
# (spelled in config so that the CLI lists them without importing torch)
AL_ARMS = SELECTION_STRATEGIES
# the arms a run takes by default (the issue caps a final run at 6)
DEFAULT_AL_ARMS = ("random", "weighted", "coreset", "typiclust", "probcover", "auto")
