import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*torchvision.*")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import real_clip_tokenizer  # noqa: E402

torch.set_num_threads(2)
torch.backends.cudnn.allow_tf32 = False  # exact fp32 comparisons when the tests run on a GPU
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(scope="session")
def clip_tok(tmp_path_factory):
    """CLIP's real tokenizer, built offline."""
    return real_clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))
