"""Committee importance score variants (PC-MoE importance, plain counts, EMA): hit rate on the demo MoE, exact policy,
WikiText-2 validation fed one token at a time.  python bench/committee_scores.py"""
import moetandem
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from moetandem.analysis.eval import encode_text, evaluate_ids
from moetandem.assets import demo_model_path
ref = moetandem.load(demo_model_path(), device="cpu", progress=False)
ids = encode_text(ref, open(str(__import__("pathlib").Path(__file__).resolve().parents[2] / "shared/data/eval/wikitext2_valid.txt")).read(), 1024)
for budget in (0.25, 0.5):
    for score in ("importance", "count", "ema"):
        e = moetandem.load(demo_model_path(), device="cpu", progress=False, expert_budget=budget, policy="auto", score=score, async_swaps=False)
        q = evaluate_ids(e, ids, context=256, step=1, progress=False)
        print(budget, score, round(100 * q.expert_stats["hit_rate"], 2), e.expert_stats()["swaps"])
