"""Active learning: score the pool (uncertainty, embeddings), select what a person labels
next, write round folders and take corrected masks back."""

# arms of the simulation benchmark `srpu bench al` (here: the CLI lists them without
# importing torch)
AL_ARMS = (
    "random",
    "entropy",
    "least_confidence",
    "margin",
    "variance",
    "boundary_entropy",
    "boundary_margin",
    "coreset",
    "default",
)
