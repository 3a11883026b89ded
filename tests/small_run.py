"""A small trainer configuration and a cheap reward, shared by the trainer tests of both model families."""

PROMPTS = ["a red cube", "a blue sphere"]
SMALL = dict(
    sample_num_steps=3,
    sample_batch_size=2,
    sample_num_batches_per_epoch=2,
    train_batch_size=2,
    mixed_precision="no",
    log_with=None,
    seed=0,
)


def brightness(images, prompts, metadata):
    """Reward: mean brightness of the grid image, shape `(B,)`."""
    return images.mean(dim=(1, 2, 3)), {}
