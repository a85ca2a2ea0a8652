"""Run under ``torch.distributed.run --nproc_per_node 2`` by test_distributed_eval.py (CPU, gloo)."""

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from accelerate import PartialState
from eval_helpers import documents, tiny_gpt2, tiny_tokenizer

from emo_trainer.evaluation import GenerationEvalCallback
from emo_trainer.evaluation.config import EvalConfig
from emo_trainer.evaluation.generation import generate_continuations
from emo_trainer.evaluation.metrics.mauve import HashingFeaturizer, featurize
from emo_trainer.evaluation.prompts import build_prompts
from emo_trainer.evaluation.sharding import broadcast_from_main, process_info, release_process_group


def echo_sampler(model, tokenizer, prompts, config, *, seed=0):
    return [f"{p} [{seed}]" for p in prompts]


def main(out_dir: str) -> None:
    state = PartialState()
    rank, world = process_info()
    docs = documents(80)
    tok = tiny_tokenizer(docs[:40])
    model = tiny_gpt2(tok).to(state.device)
    prompts = [f"prompt {i}" for i in range(5)]  # uneven over 2 processes: the last shard is padded
    texts = generate_continuations(model, tok, prompts, EvalConfig(), seed=7, sampler=echo_sampler)
    feats = featurize(HashingFeaturizer(), documents(5))
    cfg = EvalConfig(prompt_words=8, continuation_words=24, max_new_tokens=6, mauve_featurizer="hashing",
                     mauve_kmeans_num_redo=1, mauve_kmeans_max_iter=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cb = GenerationEvalCallback(build_prompts(docs, 8, 24, 50), cfg, tok, compute_perplexity=False)
        metrics = cb.generation_metrics(model, tok)
    metrics.pop("generation_runtime"), metrics.pop("mauve_runtime")
    result = {"rank": rank, "world": world, "texts": texts, "feats": feats.tolist(),
              "broadcast": broadcast_from_main(f"from rank {rank}"), "metrics": metrics}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    release_process_group()  # without it gloo aborts the process at exit now and then (SIGABRT)


if __name__ == "__main__":
    main(sys.argv[1])
