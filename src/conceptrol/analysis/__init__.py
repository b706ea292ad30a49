"""The attention block analysis (arXiv 2503.06568, Figs. 5-6; ALGORITHM.md section 5): which block's textual concept
map finds the subject best, for any base model, so Conceptrol can use it as the concept-specific block.

`analyze_blocks(pipe, prompt=..., concept=..., mask=...)` records every block's map on the stock pipeline, scores it
by ROC AUC against the subject mask at every step, and ranks the blocks; `result.save(folder)` writes analysis.json
(which `--concept-layer auto:DIR/analysis.json` reads), the images, Fig. 6's plot, Fig. 5's panel and a page.
"""

from .masks import read_mask
from .result import AnalysisCase, BlockAnalysis, CaseResult, read_analysis
from .run import analyze_blocks
from .segment import SEGMENTERS, load_segmenter

__all__ = ["SEGMENTERS", "AnalysisCase", "BlockAnalysis", "CaseResult", "analyze_blocks", "load_segmenter",
           "read_analysis", "read_mask"]
