"""The demo pipeline: synthetic corpus -> tiny stand-in checkpoints -> the real MM-LLaMA steps -> accuracy summary.

Every step after the stand-ins runs the project's real commands (`mm_llama.cli`, in this process, with the exact
command line printed, so that a user can re-run any step by hand): checkpoint conversion, `mm-llama build-datasets`,
`mm-llama train` with the demo recipes (shipped in the package: mm_llama/demo/recipes/), `mm-llama merge` and
`mm-llama evaluate`. The code that runs is the code that trains LLaMA-2-7B on a GPU; only the sizes differ.

Over 400 lines as one module so that the demo's steps read in order, top to bottom, as a user sees them run.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..progress import progress_bars_enabled
from .conversations import QUESTION_TYPES
from .corpus import CORPUS_SIZES, CorpusPaths, generate_corpus, read_eval_items
from .reporting import CommandRunner, Reporter, StepError, progress_bar, run_step
from .tiny_imagebind import IMAGEBIND_IMAGE_SIZE, pretrain_tiny_imagebind
from .tiny_llama import TinyLlamaSpec, pretrain_tiny_llama, train_tokenizer

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # package data: works from a wheel install too


@dataclass(frozen=True)
class DemoSize:
    """Knobs of one demo size. `smoke` is what the test runs; `full` is the demo of docs/demo.md."""

    corpus: str
    vocab_size: int
    llama_steps: int
    imagebind_held_out: int
    imagebind_steps: int
    imagebind_examples: int  # distinct scenes the stand-in ImageBind is pre-trained on
    stage1_epochs: float
    stage2_epochs: float
    max_steps: int | None = None  # overrides the epochs of both stages (--steps)


DEMO_SIZES: dict[str, DemoSize] = {
    "tiny": DemoSize(corpus="tiny", vocab_size=400, llama_steps=40, imagebind_held_out=100, imagebind_steps=20,
                     imagebind_examples=200, stage1_epochs=1, stage2_epochs=1),
    "smoke": DemoSize(corpus="smoke", vocab_size=512, llama_steps=1600, imagebind_held_out=200, imagebind_steps=200,
                      imagebind_examples=2000, stage1_epochs=6, stage2_epochs=6),
    "full": DemoSize(corpus="full", vocab_size=512, llama_steps=1600, imagebind_held_out=400, imagebind_steps=300,
                     imagebind_examples=3000, stage1_epochs=3, stage2_epochs=4),
}


@dataclass
class DemoPaths:
    """Every artefact of a demo run, under one output folder."""

    root: Path
    corpus: CorpusPaths = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()
        self.corpus = CorpusPaths.under(self.root / "corpus")

    @property
    def meta_llama(self) -> Path:  # Meta's download layout: consolidated.00.pth + params.json + tokenizer.model
        return self.root / "checkpoints" / "meta" / "llama-tiny-chat"

    @property
    def meta_imagebind(self) -> Path:  # stands in for imagebind_huge.pth
        return self.root / "checkpoints" / "meta" / "imagebind_tiny.pth"

    @property
    def hf_llama(self) -> Path:
        return self.root / "checkpoints" / "hf" / "llama-tiny-chat"

    @property
    def hf_imagebind(self) -> Path:
        return self.root / "checkpoints" / "hf" / "imagebind-tiny-vision"

    def dataset(self, name: str) -> Path:
        return self.root / "datasets" / name

    def run(self, stage: int) -> Path:
        return self.root / "runs" / f"stage{stage}"

    @property
    def merged(self) -> Path:
        return self.root / "mm-llama-tiny"

    def evaluation(self, name: str) -> Path:
        return self.root / "eval" / f"{name}.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


# ------------------------------------------------------------------------------------------------- evaluation
def accuracy_by_type(eval_items: list[dict], predictions: dict[str, str]) -> dict[str, dict]:
    """Per question type: accuracy of generated answers (the key word of the reference answer appears as a word in
    the prediction and no other answer choice of the type does), count and chance level."""
    correct: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    for item in eval_items:
        qt = QUESTION_TYPES[item["type"]]
        words = set(predictions.get(item["id"], "").lower().replace(".", " ").replace(",", " ").split())
        named = {choice for choice in qt.choices if choice in words}
        count[qt.name] += 1
        correct[qt.name] += named == {item["key"]}
    return {name: {"accuracy": correct[name] / count[name], "count": count[name],
                   "chance": QUESTION_TYPES[name].chance} for name in QUESTION_TYPES if count[name]}


def format_accuracy_table(results: dict[str, dict[str, dict]]) -> str:
    """Rows: question types; columns: chance and each evaluated model."""
    names = list(results)
    header = f"    {'question type':<18} {'n':>4} {'chance':>7} " + " ".join(f"{n:>16}" for n in names)
    lines = [header]
    types = [t for t in QUESTION_TYPES if any(t in r for r in results.values())]
    for t in types:
        first = next(r[t] for r in results.values() if t in r)
        cells = " ".join(f"{results[n][t]['accuracy']:>16.1%}" if t in results[n] else f"{'-':>16}" for n in names)
        lines.append(f"    {t:<18} {first['count']:>4} {first['chance']:>7.0%} {cells}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- the demo
@dataclass
class DemoConfig:
    output: Path
    size: str = "full"
    steps: int | None = None
    device: str = "auto"
    seed: int = 0
    num_workers: int = 2

    def resolved_size(self) -> DemoSize:
        if self.size not in DEMO_SIZES:
            raise ValueError(f"Unknown demo size {self.size!r}; choose one of {sorted(DEMO_SIZES)}.")
        size = DEMO_SIZES[self.size]
        return replace(size, max_steps=self.steps) if self.steps is not None else size

    def resolved_device(self) -> str:
        from ..loading import resolve_device

        return str(resolve_device(self.device))


STEP_NAMES = ("corpus", "tokenizer", "tiny LLaMA", "tiny ImageBind", "build-datasets", "stage 1", "stage 2", "merge",
              "evaluation")  # short names of STEP_TITLES, for the time table and summary.json
STEP_TITLES = (
    "Synthetic corpus (images, mp4 videos, upstream-format conversations, held-out eval set)",
    "Tokenizer: sentencepiece BPE trained on the corpus text with LLaMA's settings",
    "Tiny LLaMA 'chat' stand-in: pre-trained on the corpus text, saved in Meta's format, converted",
    "Tiny ImageBind stand-in: pre-trained on its own scenes, saved as Meta's flat .pth, converted",
    "build-datasets: ImageBind embeddings of every image and video into Arrow datasets",
    "Stage 1: projector training (LLM frozen) with mm-llama train and the demo stage1.yaml",
    "Stage 2: LoRA + projector instruction tuning with mm-llama train and the demo stage2.yaml",
    "Merge the LoRA adapter into one MM-LLaMA model (mm-llama merge)",
    "Generation eval on the held-out set (mm-llama evaluate) and sample chats",
)


def run_demo(config: DemoConfig, run_command: CommandRunner, reporter: Reporter | None = None) -> dict:
    """Runs every step of the demo into `config.output`, each command with `run_command` (`mm_llama.cli.run_command`);
    returns the summary (also written to summary.json)."""
    started = time.monotonic()
    size = config.resolved_size()
    device = config.resolved_device()
    paths = DemoPaths(config.output)
    paths.root.mkdir(parents=True, exist_ok=True)
    reporter = reporter or Reporter(len(STEP_TITLES), run_command)
    with _library_progress_bars_off():
        summary = _run_steps(config, size, device, paths, reporter)
    summary["timings_s"] = {STEP_NAMES[STEP_TITLES.index(title)]: round(seconds, 1)
                            for title, seconds in reporter.timings.items()}
    summary["total_s"] = round(time.monotonic() - started, 1)
    paths.summary.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _print_closing_summary(summary, paths, reporter)
    return summary


@contextlib.contextmanager
def _library_progress_bars_off():
    """Hides transformers' and datasets' own bars ("Loading weights", "Writing model shards", "Saving the dataset"):
    at the demo's sizes each is a flash of noise per command; the steps keep their own bars (or none with
    --no_progress). Restores the libraries' settings afterwards."""
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_on, datasets_on = transformers_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if transformers_on:
            transformers_logging.enable_progress_bar()
        if datasets_on:
            datasets.enable_progress_bars()


def _run_steps(config: DemoConfig, size: DemoSize, device: str, paths: DemoPaths, reporter: Reporter) -> dict:
    reporter.print(f"MM-LLaMA demo: size {config.size}, device {device}, seed {config.seed}, output {paths.root}")
    run = _DemoRun(config, size, device, paths, reporter, {"size": config.size, "device": device, "seed": config.seed,
                                                            "knobs": asdict(size), "output": str(paths.root)})
    steps = (run.corpus, run.tokenizer, run.tiny_llama, run.tiny_imagebind, run.build_datasets, run.stage1,
             run.stage2, run.merge, run.evaluation)
    for title, step in zip(STEP_TITLES, steps, strict=True):
        with reporter.step(title) as context:
            step(context)
    return run.summary


@dataclass
class _DemoRun:
    """One demo run: its settings, the summary its steps fill in, and one method per step of STEP_TITLES, in order;
    each gets the step's reporting context to note its results on."""

    config: DemoConfig
    size: DemoSize
    device: str
    paths: DemoPaths
    reporter: Reporter
    summary: dict
    tokenizer_model: Path | None = None

    def corpus(self, step) -> None:
        paths = self.paths.corpus
        _, corpus = generate_corpus(paths.root, CORPUS_SIZES[self.size.corpus], seed=self.config.seed)
        counts = corpus["counts"]
        step.note(f"stage 1 (CC3M chat.json format): {counts['cc3m_records']} captioned images -> {paths.cc3m_json}")
        step.note(f"stage 2 (LLaVA-Instruct format): {counts['instruct_records']} image conversations -> "
                  f"{paths.instruct_json}")
        step.note(f"stage 2 (VideoChat format): {counts['videochat_records']} mp4 clips with Q/A -> "
                  f"{paths.videochat_json}")
        step.note(f"held-out eval: {counts['eval_questions']} questions {counts['eval_questions_by_type']}")
        step.note(f"pre-training text: {counts['pretrain_items']} captions and text-only chats")
        self.summary["corpus"] = counts

    def tokenizer(self, step) -> None:
        self.tokenizer_model = train_tokenizer(self.paths.corpus.pretrain_text,
                                               self.paths.root / "checkpoints" / "tokenizer",
                                               vocab_size=self.size.vocab_size)
        step.note(f"vocabulary {self.size.vocab_size} (LLaMA-2: 32000) -> {self.tokenizer_model}")

    def tiny_llama(self, step) -> None:
        paths = self.paths
        llama = pretrain_tiny_llama(paths.corpus.pretrain_jsonl, self.tokenizer_model, paths.meta_llama,
                                    spec=TinyLlamaSpec(), steps=self.size.llama_steps, seed=self.config.seed,
                                    device=self.device,
                                    on_step=progress_bar("pre-training tiny LLaMA", progress_bars_enabled()))
        step.note(f"{llama['parameters'] / 1e6:.2f} M parameters, {llama['steps']} steps, final loss "
                  f"{llama['final_loss']:.3f} ({llama['seconds']:.0f} s) -> {paths.meta_llama}")
        run_step("convert-meta", ["--input_dir", paths.meta_llama, "--output_dir", paths.hf_llama,
                                  "--dtype", "float32", "--no_progress"], self.reporter)
        step.note(f"converted to a Hugging Face LLaMA folder -> {paths.hf_llama}")
        self.summary["llama"] = llama

    def tiny_imagebind(self, step) -> None:
        paths, size = self.paths, self.size
        imagebind = pretrain_tiny_imagebind(paths.meta_imagebind, image_size=IMAGEBIND_IMAGE_SIZE,
                                            held_out_examples=size.imagebind_held_out, steps=size.imagebind_steps,
                                            training_examples=size.imagebind_examples,
                                            seed=self.config.seed, device=self.device,
                                            on_step=progress_bar("pre-training tiny ImageBind",
                                                                 progress_bars_enabled()))
        accuracy = ", ".join(f"{k} {v:.0%}" for k, v in imagebind["held_out_attribute_accuracy"].items())
        step.note(f"{imagebind['parameters'] / 1e6:.2f} M parameters, {imagebind['steps']} steps; held-out attribute "
                  f"accuracy of its pre-training heads (discarded): {accuracy}")
        run_step("convert-imagebind", ["--checkpoint", paths.meta_imagebind, "--output_dir", paths.hf_imagebind,
                                       "--preset", "tiny", "--image_size", IMAGEBIND_IMAGE_SIZE], self.reporter)
        step.note(f"converted to an ImageBindVisionModel folder -> {paths.hf_imagebind}")
        self.summary["imagebind"] = imagebind

    def build_datasets(self, step) -> None:
        corpus = self.paths.corpus
        builds = {
            "cc3m": ["--source", "llava", "--json", corpus.cc3m_json, "--media_dir", corpus.cc3m_images],
            "llava_instruct": ["--source", "llava", "--json", corpus.instruct_json, "--media_dir",
                               corpus.instruct_images],
            "videochat": ["--source", "videochat", "--json", corpus.videochat_json, "--media_dir",
                          corpus.videochat_videos],
            "two_media": ["--source", "records", "--json", corpus.two_media_jsonl, "--media_dir", corpus.root],
        }
        self.summary["datasets"] = {}
        for name, source in builds.items():
            output = self.paths.dataset(name)
            run_step("build-datasets", [*source, "--encoder", self.paths.hf_imagebind, "--output", output,
                                        "--validation_ratio", "0.05", "--seed", self.config.seed, "--batch_size", 32,
                                        "--num_workers", self.config.num_workers, "--overwrite",
                                        "--no_progress"], self.reporter)  # seconds each; summary lines suffice
            manifest = json.loads((output / "manifest.json").read_text())
            self.summary["datasets"][name] = manifest.get("counts", manifest)
            step.note(f"{name}: {_dataset_counts(output)} -> {output}")

    def _train(self, stage: int, recipe_args: list, epochs: float, step) -> None:
        """`mm-llama train` with the demo's recipe of `stage`, then its metrics noted and summarised."""
        common = ["--seed", str(self.config.seed)] + (["--use_cpu", "true"] if self.device == "cpu" else [])
        if not progress_bars_enabled():  # the Trainer draws its bar itself
            common += ["--disable_tqdm", "true"]
        if self.size.max_steps is not None:
            common += ["--max_steps", str(self.size.max_steps)]
        run = self.paths.run(stage)
        run_step("train", [RECIPES_DIR / f"stage{stage}.yaml", *recipe_args, "--output_dir", run,
                           "--num_train_epochs", epochs, *common], self.reporter)
        self.summary[f"stage{stage}"] = _train_metrics(run)
        step.note(_format_train_metrics(self.summary[f"stage{stage}"]) + f" -> {run} (TensorBoard: {run}/runs)")

    def stage1(self, step) -> None:
        self._train(1, ["--model_name_or_path", self.paths.hf_llama, "--dataset_paths", self.paths.dataset("cc3m")],
                    self.size.stage1_epochs, step)

    def stage2(self, step) -> None:
        datasets = [self.paths.dataset(name) for name in ("llava_instruct", "videochat", "two_media")]
        self._train(2, ["--model_name_or_path", self.paths.run(1), "--dataset_paths", *datasets],
                    self.size.stage2_epochs, step)

    def merge(self, step) -> None:
        run_step("merge", [self.paths.run(2), self.paths.merged], self.reporter)
        step.note(f"merged model (AutoModelForCausalLM.from_pretrained loads it) -> {self.paths.merged}")

    def evaluation(self, step) -> None:
        paths = self.paths
        eval_items = read_eval_items(paths.corpus.eval_jsonl)
        results = {}
        for name, model_dir in (("after stage 1", paths.run(1)), ("after stage 2", paths.merged)):
            predictions = run_generation_eval(model_dir, paths, name.replace(" ", "_"), self.reporter, self.device)
            results[name] = accuracy_by_type(eval_items, predictions)
        self.summary["accuracy"] = results
        step.note("held-out answer accuracy (generation, greedy):\n" + format_accuracy_table(results))
        self.summary["samples"] = sample_chats(eval_items, predictions, paths)
        for sample in self.summary["samples"]:
            step.note(f"[{sample['media']}] shows: {sample['description']}\n      Q: {sample['question']}\n"
                      f"      A: {sample['answer']}   (reference: {sample['reference']})")
        self._live_chats()

    def _live_chats(self) -> None:
        """Two live chats with the merged model, as a user would start them (streamed to the terminal)."""
        samples = self.summary["samples"]
        live = [next((s for s in samples if s["media_type"] == kind), None) for kind in ("image", "video")]
        for sample in filter(None, live):
            self.reporter.print(f"    chat about {sample['media']} ({sample['description']})")
            run_step("chat", [self.paths.merged, "--imagebind", self.paths.hf_imagebind, "--temperature", "0",
                              "--max_new_tokens", "24", "--device", self.device, "--prompt", sample["question"],
                              f"--{sample['media_type']}", self.paths.corpus.eval_jsonl.parent / sample["media"]],
                     self.reporter)


def _print_closing_summary(summary: dict, paths: DemoPaths, reporter: Reporter) -> None:
    """Time per step, where everything is, and commands to paste: chat about a held-out image and clip, the
    evaluation, TensorBoard, the web demo."""
    reporter.print(f"\nDemo finished in {summary['total_s'] / 60:.1f} min ({summary['total_s']:.0f} s). Time per step:")
    for index, (name, seconds) in enumerate(summary["timings_s"].items(), start=1):
        reporter.print(f"    [{index}] {name:<15} {seconds:>6.1f} s")
    reporter.print(f"\nOutputs in {paths.root}:")
    for label, path in (("merged model", paths.merged), ("ImageBind folder", paths.hf_imagebind),
                        ("datasets", paths.root / "datasets"), ("TensorBoard logs", paths.root / "runs"),
                        ("eval results", paths.root / "eval"), ("summary", paths.summary)):
        reporter.print(f"    {label:<17} {path}")
    model = f"{shlex.quote(str(paths.merged))} --imagebind {shlex.quote(str(paths.hf_imagebind))}"
    reporter.print("\nTry it (paste any line):")
    samples: dict[str, dict] = {}
    for sample in summary.get("samples", []):
        samples.setdefault(sample["media_type"], sample)
    for kind in ("image", "video"):
        if kind in samples:
            media = shlex.quote(str(paths.corpus.eval_jsonl.parent / samples[kind]["media"]))
            question = shlex.quote(samples[kind]["question"])
            reporter.print(f"    mm-llama chat {model} --{kind} {media} --prompt {question}")
    reporter.print(f"    mm-llama chat {model}    # interactive: /image PATH, /video PATH, /reset, /quit")
    reporter.print(f"    mm-llama evaluate {model} --qa_file {shlex.quote(str(paths.corpus.eval_jsonl))} "
                   f"--output {shlex.quote(str(paths.root / 'eval' / 'again.json'))}")
    reporter.print(f"    tensorboard --logdir {shlex.quote(str(paths.root / 'runs'))}")
    reporter.print(f"    mm-llama web {model}    # browser chat (pip install \"mm-llama[web]\")")


def _dataset_counts(path: Path) -> str:
    from datasets import load_from_disk

    splits = load_from_disk(str(path))
    return ", ".join(f"{split} {len(ds)} rows" for split, ds in splits.items())


def _train_metrics(run_dir: Path) -> dict:
    """Last logged train/eval loss and token accuracy of a run (Trainer's trainer_state.json)."""
    state_file = run_dir / "trainer_state.json"
    if not state_file.is_file():
        return {}
    history = json.loads(state_file.read_text()).get("log_history", [])
    metrics: dict = {}
    for entry in history:
        metrics.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    return metrics


def _format_train_metrics(metrics: dict) -> str:
    keys = [("train_loss", "train loss {:.3f}"), ("eval_loss", "eval loss {:.3f}"),
            ("eval_token_accuracy", "eval answer-token accuracy {:.1%}"), ("global_step", "{:.0f} steps"),
            ("train_runtime", "{:.0f} s")]
    return ", ".join(fmt.format(metrics[k]) for k, fmt in keys if k in metrics) or "(no metrics logged)"


def run_generation_eval(model_dir: Path, paths: DemoPaths, name: str, reporter: Reporter, device: str
                        ) -> dict[str, str]:
    """Answers every held-out question by greedy generation from the raw media file (embedded by the converted
    ImageBind folder, as in a user's chat) with `mm-llama evaluate --qa_file`; returns {item id: answer}."""
    output = paths.evaluation(name)
    run_step("evaluate", [model_dir, "--qa_file", paths.corpus.eval_jsonl, "--imagebind", paths.hf_imagebind,
                               "--max_new_tokens", "16", "--batch_size", "32", "--device", device,
                               "--output", output, *([] if progress_bars_enabled() else ["--no_progress"])], reporter)
    examples = json.loads(output.read_text())["generation_eval"]["examples"]
    return {example["id"]: example["prediction"] for example in examples}


def sample_chats(eval_items: list[dict], predictions: dict[str, str], paths: DemoPaths, count: int = 4) -> list[dict]:
    """A few held-out questions per media kind with the model's answer and what the media shows."""
    seen_types: set[str] = set()
    samples = []
    for item in eval_items:
        if item["type"] in seen_types or len(samples) >= count:
            continue
        seen_types.add(item["type"])
        samples.append({"media": item["media"], "media_type": item["media_type"], "description": item.get("description", ""),
                        "question": item["question"], "answer": predictions.get(item["id"], ""),
                        "reference": item["answers"][0]})
    return samples


__all__ = ["DEMO_SIZES", "DemoConfig", "DemoPaths", "DemoSize", "Reporter", "StepError", "accuracy_by_type",
           "format_accuracy_table", "run_demo", "run_step"]
