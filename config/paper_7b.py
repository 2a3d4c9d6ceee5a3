# The paper's setting (Sec. 5.1, Appendix A.1): a LLaVA-style 7B video model, QLoRA, G = 5, 4 GPUs.
#   python convert.py --src=/models/vlm-rlaif-sft --vision=/models/clip-vit-large-patch14-336 --out=/models/vlm-sft-videolm
#   torchrun --nproc_per_node=4 train.py config/paper_7b.py --sft_checkpoint=/models/vlm-sft-videolm \
#       --train_data=/data/rl_prompts.jsonl --eval_data=/data/msvd_qa.jsonl
# No path is baked in: the SFT checkpoint names its vision tower and LM (local dirs or hub ids); without
# one, give --vision=... --lm=... and the warm start is trained by sft.py (set sft_steps).
# Values the paper states are marked (paper); the rest are common GRPO choices it leaves open.
num_frames = 50              # (paper) frames sampled uniformly per video
dtype = "bfloat16"
load_in_4bit = True          # (paper) QLoRA: NF4 base weights, double quantisation, bf16 compute
gradient_checkpointing = True
lora_r = 64                  # (paper) "rank 65" in A.1 is read as 64
lora_alpha = 16              # (paper)
lora_dropout = 0.0            # RL runs without dropout (train.py turns it off)
num_generations = 5          # (paper) G = 5 candidate responses
batch_size = 16              # prompts per GPU: 4 x 16 = the rollout batch of 64 (paper, Sec. 5.1)
epochs = 4                   # (paper) 4 epochs for the VLM-RLAIF comparison
max_steps = 100000           # run the epochs out
max_new_tokens = 64
temperature = 1.0
learning_rate = 5e-5
warmup_steps = 20
num_iterations = 1
beta = 0.04
epsilon = 0.2
sft_steps = 0                # RL starts from a given SFT checkpoint (--sft_checkpoint)
eval_size = 500
eval_batch_size = 16
save_every = 100
num_threads = 8
clip_cache_mb = 0            # a 50-frame 336 px clip is 17 MB: raise it if the prompts' videos fit in memory
