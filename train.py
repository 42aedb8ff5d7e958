"""Train the F-LMM head on a frozen LMM with the Hugging Face Trainer.

    python train.py                                   # the offline demo (configs/demo.yaml)
    python train.py --config configs/llava-1.5-7b.yaml [--any_argument value ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml train.py --config configs/llava-1.5-7b.yaml

The YAML gives the values; flags on the command line override them. Every field of
`ModelArguments`, `DataArguments` and `FLMMTrainingArguments` (a `TrainingArguments`) can be set.
"""

from pathlib import Path

from flmm_hf.training import parse_arguments, run_training

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def main(argv=None):
    model_args, data_args, training_args = parse_arguments(argv, default_config=DEFAULT_CONFIG)
    return run_training(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
