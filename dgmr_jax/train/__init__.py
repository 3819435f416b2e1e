"""The training core every task plugs into: loop, state and optimizer, checkpoint, workdir, logs, AOT compile.
It knows no stage (distill, UVC search, text fine-tune live in their own packages)."""
