"""The options of the `mm-llama` commands, declared once as dataclasses that `add_dataclass_arguments` turns into
flags as transformers' `HfArgumentParser` does (each field's `help` is its flag's help; the flag is the field's name,
snake_case as in transformers), the few arguments that are not fields (positionals, repeatable flags), each command's
examples, and the one rewrite of the deprecated kebab-case spellings. Standard library only: a command's `--help`
reads this without loading torch.

The model-loading and generation options are shared by chat, web, evaluate and serve; `BuildConfig`
(mm_llama.data.build_config) holds the dataset-build options.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from typing import Collection, Sequence, TextIO

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def _help(text: str, **extra) -> dict:
    return {"metadata": {"help": text, **extra}}


@dataclass
class ModelLoadingArguments:
    """How chat, web, evaluate and serve load the trained model (the MODEL folder is their positional argument)."""

    _argument_group_name = "model loading"

    device: str = field(default="auto", **_help("cpu, cuda, cuda:N, or auto (GPU when present)"))
    dtype: str | None = field(default=None, **_help("default: float32 on CPU, bfloat16 on GPU",
                                                    choices=DTYPE_CHOICES))
    load_in_4bit: bool = field(default=False, **_help("quantise the language model to 4 bit (nf4)"))
    imagebind: str | None = field(default=None, **_help(
        "converted ImageBind folder (mm-llama convert-imagebind): embeds raw images/videos for a model without a "
        "vision tower, and raw audio when converted with --modality all"))
    base_model: str | None = field(default=None, **_help(
        "stage-1 folder for a stage-2 adapter MODEL, if not the recorded one"))


@dataclass
class GenerationArguments:
    """What an answer is (sampling) and how fast it is decoded. Unset sampling options come from the model's
    generation_config.json, else from `mm_llama.generation.GenerationSettings` (LLaMA-2-chat's: temperature 0.6,
    top_p 0.9, 256 new tokens); `mm-llama evaluate` decodes greedily, 64 new tokens, unless told otherwise."""

    _argument_group_name = "generation (unset: the model's generation_config.json, else LLaMA-2-chat's defaults)"

    max_new_tokens: int | None = field(default=None, **_help("answer length limit (LLaMA-2-chat default: 256)"))
    temperature: float | None = field(default=None, **_help("sampling temperature; 0 = greedy (default: 0.6)"))
    top_p: float | None = field(default=None, **_help("nucleus sampling's top-p (default: 0.9)"))
    compile: bool = field(default=False, **_help(
        "static KV cache + torch.compile'd decoding step (CUDA graphs on a GPU); same answers, the first answer of "
        "each batch size waits for the compilation (ignored with --load_in_4bit); see docs/generation.md"))
    prompt_lookup_num_tokens: int | None = field(default=None, **_help(
        "prompt-lookup decoding: verify up to N tokens copied from the prompt per step; same answers, pays for long "
        "answers that quote the prompt (one conversation at a time)", metavar="N"))

    def __post_init__(self) -> None:
        rules = {"max_new_tokens": (self.max_new_tokens, lambda value: value >= 1, ">= 1"),
                 "temperature": (self.temperature, lambda value: value >= 0, ">= 0 (0: greedy)"),
                 "top_p": (self.top_p, lambda value: 0 < value <= 1, "in (0, 1]"),
                 "prompt_lookup_num_tokens": (self.prompt_lookup_num_tokens, lambda value: value >= 1, ">= 1")}
        for name, (value, ok, rule) in rules.items():
            if value is not None and not ok(value):
                raise ValueError(f"--{name} must be {rule}, got {value}")

    def sampling(self) -> dict[str, float | int]:
        """The sampling options the user gave (`GenerationSettings.from_generation_config` overrides)."""
        given = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}
        return {name: value for name, value in given.items() if value is not None}


@dataclass
class ChatArguments:
    system: str | None = field(default=None, **_help("system prompt"))
    stream: bool = field(default=True, **_help("print the answer as it is generated (interactive and one-shot)"))
    prompt: str | None = field(default=None, **_help("one-shot: answer this message and exit"))
    batch_file: str | None = field(default=None, **_help(
        "one-shot prompts from a JSONL file, answered in batches; a bad line gets an error record and the others "
        "are answered"))
    image: str | None = field(default=None, **_help("one-shot: image file or embedding file for --prompt"))
    video: str | None = field(default=None, **_help("one-shot: video file or embedding file for --prompt"))
    audio: str | None = field(default=None, **_help(
        "one-shot: audio file (or a video's sound track) or embedding file for --prompt"))
    batch_size: int = field(default=8, **_help("--batch_file: prompts per batch"))
    output: str | None = field(default=None, **_help("--batch_file: JSONL to write (default: stdout)"))

    def __post_init__(self) -> None:
        media = [kind for kind in ("image", "video", "audio") if getattr(self, kind)]
        if self.prompt is not None and self.batch_file:
            raise ValueError("give --prompt or --batch_file, not both")
        if len(media) > 1:
            raise ValueError(f"give one of --image/--video/--audio, not {' and '.join(media)}")
        if media and self.prompt is None:
            raise ValueError("--image/--video/--audio go with --prompt (in interactive mode, use /image PATH).")

    @property
    def media(self) -> tuple[str, str] | None:
        """(media type, path) of the one-shot prompt's media, if any."""
        return next(((kind, getattr(self, kind)) for kind in ("image", "video", "audio") if getattr(self, kind)), None)


@dataclass
class WebArguments:
    host: str = field(default="127.0.0.1", **_help("address to serve on (0.0.0.0: every interface)"))
    port: int = field(default=7860, **_help("port to serve on"))
    share: bool = field(default=False, **_help("also open a temporary public gradio.live link"))
    system: str = field(default="", **_help("the system prompt box's initial value"))
    concurrency: int = field(default=1, **_help(
        "generations run at the same time (1: one GPU); others wait in the queue"))
    max_queue: int | None = field(default=None, **_help(
        "waiting requests before new ones are refused (default: unlimited)"))
    max_media: int = field(default=1, **_help("media files per conversation (1, as the original MM-LLaMA's demo)"))

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")


@dataclass
class ProgressArguments:
    """The one progress switch of the commands that draw bars (build-datasets, evaluate, convert-meta, the downloads,
    demo): `--no_progress` turns mm_llama.progress's switch off for the command, so every bar (MM-LLaMA's,
    transformers', datasets', huggingface_hub's) is hidden and only the summaries are printed."""

    progress: bool = field(default=True, **_help("progress bars (--no_progress: summaries only)"))


@dataclass
class EvaluateArguments:
    output: str = field(metadata={"help": "JSON file to write"})
    dataset: str | None = field(default=None, **_help("built dataset folder for loss / token accuracy"))
    split: str = field(default="validation", **_help("the dataset's split"))
    train_on: str = field(default="all", **_help(
        "which answers are trained answers (as in the recipe); 'last': earlier ones are prompt",
        choices=("all", "last")))
    prompt_loss_weight: float = field(default=0.0, **_help(
        "as in the recipe, so that 'loss' equals the run's eval_loss (accuracy counts answers only)"))
    max_seq_len: int | None = field(default=None, **_help("as in the recipe (default: whole conversations)"))
    truncation: str = field(default="truncate", **_help("as in the recipe", choices=("truncate", "drop")))
    qa_file: str | None = field(default=None, **_help("JSONL of {media, question, answers} for the generation eval"))
    system: str | None = field(default=None, **_help("system prompt for the generation eval"))
    batch_size: int = field(default=8, **_help("examples per batch"))
    max_examples: int | None = field(default=None, **_help("evaluate only the first N examples"))

    def __post_init__(self) -> None:
        if not self.dataset and not self.qa_file:
            raise ValueError("give --dataset (loss/accuracy), --qa_file (generation), or both.")


@dataclass
class ConvertMetaArguments:
    input_dir: str = field(metadata={"help": "Meta model folder with params.json and consolidated.*.pth"})
    output_dir: str = field(metadata={"help": "Hugging Face output folder"})
    tokenizer_path: str | None = field(default=None, **_help(
        "Meta's tokenizer.model (or its folder); default: --input_dir, then its parent folder"))
    dtype: str = field(default="float16", **_help("dtype of the saved weights", choices=DTYPE_CHOICES))
    max_shard_size: str = field(default="5GB", **_help("largest weight file, e.g. 5GB or 2GiB"))
    max_position_embeddings: int = field(default=4096, **_help(
        "context length (not stored in params.json; LLaMA-2: 4096)"))
    safe_serialization: bool = field(default=True, **_help("safetensors (--no_safe_serialization: PyTorch .bin)"))


@dataclass
class ConvertImageBindArguments:
    checkpoint: str = field(metadata={"help": "Meta's imagebind_huge.pth (flat state dict)"})
    output_dir: str = field(metadata={"help": "folder to write config.json + model.safetensors into"})
    modality: str = field(default="vision", **_help(
        "vision: the vision tower; audio: the audio tower; all: both, into OUTPUT_DIR/vision and OUTPUT_DIR/audio "
        "(what --imagebind takes for raw audio)", choices=("vision", "audio", "all")))
    dtype: str = field(default="float32", **_help("dtype of the saved weights", choices=DTYPE_CHOICES))
    preset: str | None = field(default=None, **_help(
        "architecture preset (of every converted tower); inferred from the weight shapes when omitted",
        choices=("huge", "tiny")))
    image_size: int | None = field(default=None, **_help("override the vision preset's image size"))


@dataclass
class MergeArguments:
    mode: str = field(default="auto", **_help(
        "auto: merge an adapter folder, make a stage-2 start from a full model folder",
        choices=("auto", "merge", "stage2-start")))
    base_model: str | None = field(default=None, **_help(
        "merge: the stage-1 folder, if the adapter's recorded one is not here"))
    dtype: str | None = field(default=None, **_help("merge: dtype to merge and save in (default: as saved)",
                                                    choices=DTYPE_CHOICES))
    push_to_hub: str | None = field(default=None, **_help("merge: also upload the merged folder to this Hub repo",
                                                          metavar="REPO"))
    public: bool = field(default=False, **_help("with --push_to_hub: create a public repo"))
    # No defaults here: unset values fall back to mm_llama.loading.LORA_DEFAULTS (the recipes' LoRA), declared once.
    lora_r: int | None = field(default=None, **_help("stage2-start: LoRA rank (default: the recipes' LoRA)"))
    lora_alpha: float | None = field(default=None, **_help("stage2-start: LoRA alpha (default: the recipes' LoRA)"))
    lora_dropout: float | None = field(default=None, **_help(
        "stage2-start: LoRA dropout (default: the recipes' LoRA)"))


@dataclass
class DownloadImageBindArguments:
    output: str = field(default="imagebind_huge.pth", **_help("destination file"))
    url: str | None = field(default=None, **_help("source URL (default: Meta's public URL, about 4.5 GB)"))
    timeout: float = field(default=30.0, **_help("network timeout in seconds"))


@dataclass
class DownloadWebvidArguments:
    videochat_json: str = field(metadata={"help": "videochat_instruct_11k.json"})
    metadata: str = field(metadata={"help": "WebVid-10M metadata CSV (videoid, contentUrl, page_dir)"})
    output: str = field(metadata={"help": "folder receiving the videos"})
    layout: str = field(default="folder", **_help(
        "folder: <page_dir>/<videoid>.mp4 as the JSON names them; flat: <videoid>.mp4", choices=("folder", "flat")))
    threads: int = field(default=16, **_help("parallel downloads"))
    retries: int = field(default=3, **_help("retries per video on transient errors"))
    backoff: float = field(default=1.0, **_help("first retry delay in seconds (doubles each time)"))
    timeout: float = field(default=60.0, **_help("per-request timeout in seconds"))
    failures_json: str | None = field(default=None, **_help("default: <output>/download_failures.json"))


@dataclass
class DemoArguments:
    output: str = field(default="demo", **_help("folder for every artefact (created; reused files are replaced)"))
    size: str = field(default="full", **_help(
        "full: the demo of docs/demo.md; smoke: faster, what the tests run; tiny: seconds, learns little",
        choices=("tiny", "smoke", "full")))
    steps: int | None = field(default=None, **_help(
        "train each stage for exactly this many optimizer steps (overrides the size's epochs)"))
    device: str = field(default="auto", **_help("auto (GPU when present), cpu, cuda or cuda:N"))
    seed: int = field(default=0, **_help("corpus, stand-in and training seed"))
    threads: int | None = field(default=None, **_help(
        "PyTorch CPU threads (default: PyTorch's choice). On a machine shared with other jobs, --threads 1 avoids "
        "threads waiting on each other and can be many times faster"))
    num_workers: int = field(default=2, **_help("decoding processes of build-datasets"))


# ------------------------------------------------------------------------- arguments that are not fields

SOURCE_KINDS = ("llava", "videochat", "records")  # mm_llama.data.sources.SOURCE_KINDS (a test keeps them equal)

EPILOGS = {
    "train": "examples:\n"
             "  mm-llama train recipes/stage1.yaml --model_name_or_path outputs/llama-2-7b-chat-hf\n"
             "  mm-llama train recipes/original/stage2.yaml --resume_from_checkpoint latest\n"
             "Many GPUs: accelerate launch scripts/train.py RECIPE.yaml",
    "build-datasets":
        "examples:\n"
        "  mm-llama build-datasets --source llava --json cc3m/chat.json --media_dir cc3m/images \\\n"
        "      --encoder checkpoints/imagebind_huge --output outputs/datasets/cc3m\n"
        "  accelerate launch scripts/build_datasets.py --source llava --json llava_instruct_150k.json \\\n"
        "      --media_dir coco/train2017 --source videochat --json videochat_instruct_11k.json --media_dir webvid \\\n"
        "      --encoder checkpoints/imagebind_huge --dtype bfloat16 --output outputs/datasets/stage2\n"
        "Each --source takes the next --json and --media_dir. A killed build resumes when re-run with the same\n"
        "arguments; --overwrite starts again. Several CPU processes: torchrun --nproc_per_node N\n"
        "scripts/build_datasets.py --cpu ...",
    "chat": "Interactive (stdin; /image PATH, /video PATH, /audio PATH, /reset, /quit; history kept across turns):\n"
            "  mm-llama chat outputs/mm-llama-7b --imagebind checkpoints/imagebind_huge\n"
            "One-shot:  mm-llama chat MODEL --prompt \"What is in the image?\" --image cat.jpg\n"
            "Batched one-shot prompts (JSONL lines {\"prompt\", \"image\"|\"video\"?, \"system\"?, \"id\"?}):\n"
            "  mm-llama chat MODEL --batch_file prompts.jsonl --output answers.jsonl\n"
            "Media are raw image/video/audio files or precomputed embedding files (.pt/.npy/.safetensors holding a\n"
            "[1024] vector). Raw audio needs an --imagebind folder converted with --modality all (zero-shot: the\n"
            "projector was trained on images and videos). --temperature 0 decodes greedily.",
    "web": "A browser chat (Gradio) in one process: the model is loaded once, answers are streamed, requests wait in\n"
           "a queue (--concurrency at a time). Needs the web extra: pip install \"mm-llama[web]\". The generation\n"
           "options are the initial values of the page's controls.\n"
           "  mm-llama web outputs/mm-llama-7b --imagebind checkpoints/imagebind_huge   # open http://127.0.0.1:7860\n"
           "  mm-llama web outputs/mm-llama-7b --imagebind checkpoints/imagebind_huge --load_in_4bit --host 0.0.0.0",
    "evaluate": "loss / answer-token accuracy on a built dataset's split (the training metrics, same code):\n"
                "  mm-llama evaluate MODEL --dataset outputs/datasets/cc3m --output eval.json\n"
                "generation on questions about media (JSONL {\"media\", \"question\", \"answers\": [...]}; greedy, 64\n"
                "new tokens unless --temperature / --max_new_tokens say otherwise):\n"
                "  mm-llama evaluate MODEL --qa_file qa.jsonl --imagebind checkpoints/imagebind_huge \\\n"
                "      --output eval.json",
    "convert-meta": "Meta's download puts tokenizer.model beside the model folders; it is found there or inside\n"
                    "--input_dir, or given with --tokenizer_path. The output loads with LlamaForCausalLM.",
    "merge": "stage-2 output (PEFT LoRA adapter + projector) -> one merged MMLlamaForCausalLM folder;\n"
             "stage-1 output (full model) -> the stage-2 starting point (a fresh LoRA adapter folder).\n"
             "  mm-llama merge outputs/stage2 outputs/mm-llama-7b [--push_to_hub me/mm-llama-7b]",
    "download-webvid": "Re-running skips videos already downloaded; failures are listed in "
                       "<output>/download_failures.json.",
    "demo": "The whole pipeline on tiny stand-in models, on a laptop CPU, no downloads:\n"
            "  mm-llama demo --output demo --threads 1                  # the full demo\n"
            "  mm-llama demo --output demo-smoke --size smoke           # faster (what the tests run)\n"
            "  mm-llama demo --output demo --device cuda                # the same on a GPU",
}


def model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="MM-LLaMA model folder: merged, stage-1, or stage-2 adapter")


def train_arguments(parser: argparse.ArgumentParser) -> None:
    """What `mm-llama train --help` shows; train parses its arguments itself (transformers' HfArgumentParser)."""
    parser.usage = "mm-llama train [RECIPE.yaml] [--key value ...] | --help_keys"
    parser.add_argument("recipe", nargs="?", help="YAML recipe; its keys are the fields of mm_llama.training's "
                                                  "ModelArguments / DataArguments / LoraArguments and transformers' "
                                                  "TrainingArguments; `--key value` after it overrides it")
    parser.add_argument("--help_keys", action="store_true",
                        help="list every recipe key with its help (imports transformers: a few seconds)")


def build_datasets_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sources (repeat the three flags for several sources)")
    group.add_argument("--source", action="append", required=True, choices=SOURCE_KINDS,
                       help="llava (CC3M-595K chat.json, LLaVA-Instruct-150K), videochat (VideoChat-11K), "
                            "records (our JSON/JSONL format)")
    group.add_argument("--json", action="append", required=True, help="the source's JSON/JSONL file")
    group.add_argument("--media_dir", action="append", default=None,
                       help="folder the media paths are relative to (default: the JSON file's folder)")
    group.add_argument("--max_samples", type=int, default=None, help="keep the first N valid records per source")
    group.add_argument("--max_turns", type=int, default=None,
                       help="VideoChat: split each dialog into consecutive chunks of at most N question/answer pairs, "
                            "each a record of its own with the video on its first question; every pair is kept "
                            "(default: whole dialogs). The original MM-LLaMA kept dialogs of up to 5 pairs whole and "
                            "only the first 3 pairs of longer ones.")
    encoder = parser.add_argument_group("encoder")
    encoder.add_argument("--encoder", default=None,
                         help="converted ImageBind folder (mm-llama convert-imagebind; --modality all also embeds the "
                              "audio of `records` sources)")
    encoder.add_argument("--encoder_preset", default=None, help="random-init preset instead (e.g. tiny, for tests)")
    encoder.add_argument("--image_size", type=int, default=None, help="image size of a random-init preset")
    encoder.add_argument("--cpu", action="store_true",
                         help="run the encoder on CPU even where a GPU exists (and allow several CPU processes)")
    parser.add_argument("--output", required=True, help="output folder (DatasetDict + manifest.json)")


def merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", help="stage-2 output (adapter) or stage-1 output (full model) folder")
    parser.add_argument("output_dir", help="folder to write (created)")


def add_dataclass_arguments(parser: argparse.ArgumentParser, options: type) -> None:
    """Adds a flag per field of the dataclass `options`, with transformers' `HfArgumentParser` conventions (which
    this cannot use: importing transformers loads torch here, through mm_llama's Auto-class registration): the flag
    is `--field_name`; `help`, `choices`, `metavar` come from the field's metadata; a field without default is a
    required flag; an `X | None` field takes an X; the fields go in an argument group named by the class's
    `_argument_group_name`, if it has one. A bool field is a switch (`--x`), and a bool that defaults to True also
    gets its off switch `--no_x`."""
    group = parser.add_argument_group(options._argument_group_name) if hasattr(options, "_argument_group_name") \
        else parser
    hints = typing.get_type_hints(options)
    for item in dataclasses.fields(options):
        if not item.init:
            continue
        kind = hints[item.name]
        kind = next((arg for arg in typing.get_args(kind) if arg is not type(None)), kind)  # X | None -> X
        required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        default = None if required else (item.default if item.default is not dataclasses.MISSING
                                         else item.default_factory())
        if kind is bool:
            group.add_argument(f"--{item.name}", action="store_true", default=default, **item.metadata)
            if default:
                group.add_argument(f"--no_{item.name}", action="store_false", dest=item.name,
                                   help=f"turn --{item.name} off")
        else:
            group.add_argument(f"--{item.name}", type=kind, default=default, required=required, **item.metadata)


def deprecated_spellings_rewritten(argv: Sequence[str], known: Collection[str], stderr: TextIO | None = None
                                   ) -> list[str]:
    """`argv` with each kebab-case flag (`--no-progress`, `--media-dir=x`) whose snake_case spelling is one of the
    `known` option strings replaced by that spelling, printing one deprecation line per flag to `stderr`. Tokens
    after `--`, values and unknown flags are left for the parser."""
    stderr = stderr or sys.stderr
    rewritten, warned = [], set()
    for index, token in enumerate(argv):
        if token == "--":
            return rewritten + list(argv[index:])
        name, equals, value = token.partition("=")
        snake = "--" + name[2:].replace("-", "_")
        if name.startswith("--") and "-" in name[2:] and snake in known:
            if name not in warned:
                warned.add(name)
                print(f"{name} is deprecated, use {snake}; the old spelling goes in the next release", file=stderr)
            token = snake + equals + value
        rewritten.append(token)
    return rewritten


__all__ = [
    "EPILOGS", "SOURCE_KINDS", "add_dataclass_arguments", "build_datasets_arguments", "merge_arguments",
    "model_argument", "train_arguments",
    "ChatArguments", "ConvertImageBindArguments", "ConvertMetaArguments", "DTYPE_CHOICES", "DemoArguments",
    "DownloadImageBindArguments", "DownloadWebvidArguments", "EvaluateArguments", "GenerationArguments",
    "MergeArguments", "ModelLoadingArguments", "ProgressArguments", "WebArguments", "deprecated_spellings_rewritten",
]
