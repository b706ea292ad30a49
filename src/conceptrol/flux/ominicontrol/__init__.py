"""OminiControl on FLUX.1 (ALGORITHM.md section 2): the one family with its own transformer forward and denoising
loop, kept here (its subject LoRA acts on the reference tokens only, which diffusers' forward cannot do)."""
