"""Sample text from a trained language-model checkpoint (the checkpoint holds the vocabulary).

python recipes/generate.py runs/char_lm_pydoc_ln_lstm/checkpoints/last.ckpt --prompt "The " --temperature 0.7
"""

import argparse

from seqnorm.lightning import LanguageModel, check_checkpoint, check_generation


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by recipes/train_lm.py")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--length", type=int, default=300, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="> 0; lower is more certain")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    try:  # before the checkpoint is read: a typo costs no time
        check_generation(args.length, args.temperature)
        check_checkpoint(args.checkpoint, LanguageModel)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    model = LanguageModel.load_from_checkpoint(args.checkpoint, map_location="cpu")
    text = model.generate(args.prompt, args.length, args.temperature, seed=args.seed)
    print(text)
    return text


if __name__ == "__main__":
    main()
