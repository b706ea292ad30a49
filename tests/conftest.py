import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
# Idle OpenMP threads yield the CPU instead of spinning: on two cores, subprocess tests (torchrun, the UI
# server) and this process would otherwise slow each other down many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*torchvision.*")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import real_clip_tokenizer  # noqa: E402

torch.set_num_threads(2)
torch.backends.cudnn.allow_tf32 = False  # exact fp32 comparisons when the tests run on a GPU
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: fastest for them, and on 2 shared, busy cores two spinning
    OpenMP threads made a generation 10-50x slower. Modules opt in with pytestmark = usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def clip_tok(tmp_path_factory):
    """CLIP's real tokenizer, built offline."""
    return real_clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))


CORPUS = ["a photo of a dog surfing a wave", "a statue reading a book in a cafe", "a teddy bear on the moon",
          "a red car under a tree", "a cat and a dog on a sofa", "the corgi wears a hat"]


@pytest.fixture(scope="session")
def t5_tok(tmp_path_factory):
    """A tiny T5 tokenizer: a sentencepiece unigram model trained here, in T5's layout (pad 0, eos 1, no bos)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder = tmp_path_factory.mktemp("t5")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=str(folder / "spiece"), vocab_size=40, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    return T5Tokenizer.from_pretrained(str(folder), extra_ids=0, legacy=False)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """(model folder, adapter repo folder): a tiny SD 1.5 saved as diffusers saves it, and h94/IP-Adapter's layout."""
    from conceptrol.tiny import save_tiny_sd15

    return save_tiny_sd15(tmp_path_factory.mktemp("tiny-weights"))


@pytest.fixture(scope="module")
def ip_pipe(tmp_path_factory):
    """A tiny FLUX.1 pipeline with a random XLabs IP-Adapter loaded by `pipe.load_ip_adapter` (a module may define
    its own `ip_pipe`, as test_flux_reference.py does)."""
    from conceptrol.tiny import load_tiny_xlabs_ip_adapter, tiny_flux

    pipe = tiny_flux(seed=1)
    load_tiny_xlabs_ip_adapter(pipe, tmp_path_factory.mktemp("xlabs"))
    pipe.set_progress_bar_config(disable=True)
    return pipe
