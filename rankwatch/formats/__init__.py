"""The line formats rankwatch reads without configuration, one module per framework family, and the user's own
(config `[[formats]]`). `rankwatch.parsing.parse_line` is the entry point; docs/FORMATS.md lists every format.

    base        per-file context, ParseError, number and unit helpers
    prefixes    ANSI colours, torchrun `[rank3]:`, logger tags, ISO and glog timestamps
    jsonl       JSON lines with rankwatch's field names
    pyrepr      a safe reader for Python dict reprs (never eval)
    hf          Hugging Face Trainer / Accelerate dicts
    megatron    Megatron-LM / NeMo / Megatron-DeepSpeed iteration lines
    deepspeed   DeepSpeed engine, timer, pipeline and fp16 overflow lines
    torchtitan  torchtitan metrics lines (with or without ANSI colours)
    nanogpt     nanoGPT and llm.c step lines
    lightning   PyTorch Lightning CSVLogger metrics.csv
    nccl        NCCL collectives, communicator init, warnings
    torch_dist  ProcessGroupNCCL watchdog, NCCL errors, CUDA errors and OOM
    launcher    the job stopped: Slurm cancellations, torchrun and DeepSpeed tearing workers down
    user        user-defined regex formats from the config file
    registry    the order they are tried in, and parse_line
"""
