"""TRL `DDPOTrainer` methods that cannot work on `Carve3DTrainer` (written for `transformers.Trainer`, or the hub
mixin's), each delegating to the working path or raising an error that names the method to use."""

from __future__ import annotations


class UnsupportedTRLMethods:
    """Mixed into `Carve3DTrainer` before `DDPOTrainer`, so that these override TRL's."""

    def _save_pretrained(self, save_directory) -> None:
        """TRL's hub-mixin hook: the working [`save_pretrained`]."""
        self.save_pretrained(save_directory)

    def create_model_card(self, *args, **kwargs):
        """TRL's card code is written for `transformers.Trainer`; the card comes with [`save_pretrained`]."""
        raise NotImplementedError(
            "Carve3DTrainer.create_model_card is TRL's transformers.Trainer code and cannot work here; "
            "`trainer.save_pretrained(folder)` writes the model card (README.md) with the weights."
        )

    def generate_model_card(self, *args, **kwargs):
        """The hub mixin's card; the card comes with [`save_pretrained`]."""
        raise NotImplementedError(
            "Carve3DTrainer.generate_model_card cannot describe a DDPO run; "
            "`trainer.save_pretrained(folder)` writes the model card (README.md) with the weights."
        )

    def _save_checkpoint(self, *args, **kwargs):
        """TRL's `transformers.Trainer` checkpoint hook; checkpoints are [`save_checkpoint`]'s."""
        raise NotImplementedError(
            "Carve3DTrainer._save_checkpoint is TRL's transformers.Trainer hook and cannot work here; "
            "use `trainer.save_checkpoint(epoch)` (resume with Carve3DConfig(resume_from=...))."
        )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """The hub mixin's loader cannot rebuild a trainer from a saved model folder."""
        raise NotImplementedError(
            "Carve3DTrainer.from_pretrained cannot rebuild a trainer. Load a trained LoRA with diffusers "
            "(`pipe.load_lora_weights(folder)`, see the model card), or resume a run with "
            "Carve3DConfig(resume_from='<logdir or checkpoint>')."
        )

    _from_pretrained = from_pretrained
