"""tpu_scripts/: the exact command lines each script prints with --dry-run, its refusals, and the plumbing
(remote quoting, nohup launch, tarball setup, queued-resource wait, SLURM env derivation and srun) run
against fake gcloud / scontrol / srun / dgmr-jax executables. No network, cloud or scheduler."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POD = ROOT / "tpu_scripts" / "pod.sh"
GPU = ROOT / "tpu_scripts" / "gpu_cluster.sh"
RECIPE = "configs/eva02_clip_e_prune1.py"
INSTALL = 'python3 -m pip install -q -c constraints.txt -e ".[gcs]" "jax[tpu]"'
NODE = ["--name", "my-tpu", "--zone", "us-east5-a"]
ZONE = ["--zone", "us-east5-a"]
# an override with a glob and a quote: must reach dgmr-jax on the worker unexpanded and intact
TRICKY = "--config.data.path=/data/train-*.array_record"
QUOTED = "--config.note=it's"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(script, *args, env=None, home=None, check=True):
    base = {"PATH": os.environ["PATH"], "HOME": str(home or "/nonexistent"), "LC_ALL": "C"}
    proc = subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env={**base, **(env or {})}, timeout=60
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry(script, *args, env=None):
    """argv of every command a --dry-run prints; dry-run stdout holds nothing but "+ " lines."""
    proc = _run(script, "--dry-run", *args, env=env)
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), proc.stdout
    return [shlex.split(line[2:]) for line in lines]


def _fake(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)


# ------------------------------------------------------------------------------------------- pod.sh


def test_pod_plan_runs_locally_with_the_slice_topology():
    cmds = dry(POD, "plan", "--accelerator-type", "v5p-128", "--config", RECIPE, "--", TRICKY)
    assert cmds == [["dgmr-jax", "plan", "--config", RECIPE, "--topology", "v5p:4x4x4", TRICKY]]


@pytest.mark.parametrize(
    ("accel", "topology"),
    [
        ("v5p-8", "v5p:2x2x1"),
        ("v5p-128", "v5p:4x4x4"),
        ("v5p-256", "v5p:4x4x8"),
        ("v4-32", "v4:2x2x4"),
        ("v5litepod-16", "v5e:4x4"),
        ("v6e-256", "v6e:16x16"),
    ],
)
def test_pod_plan_topology_from_accelerator_type(accel, topology):
    (cmd,) = dry(POD, "plan", "--accelerator-type", accel, "--config", RECIPE)
    assert cmd[cmd.index("--topology") + 1] == topology


def test_pod_takes_v5e_as_clouds_v5litepod():
    """`v5e-64` (as plan's topologies and the docs say it) is `v5litepod-64` to Cloud: accepted, said once."""
    proc = _run(POD, "--dry-run", "create", *NODE, "--accelerator-type", "v5e-64")
    (cmd,) = [shlex.split(line[2:]) for line in proc.stdout.splitlines()]
    assert cmd[cmd.index("--accelerator-type") + 1 :] == ["v5litepod-64", "--version", "v2-alpha-tpuv5-lite"]
    assert proc.stderr.strip() == "pod.sh: --accelerator-type v5e-64 is v5litepod-64 to Cloud"
    (plan,) = dry(POD, "plan", "--accelerator-type", "v5e-64", "--config", RECIPE)
    assert plan[plan.index("--topology") + 1] == "v5e:8x8"


def test_pod_wait_without_queued_says_why():
    proc = _run(POD, "--dry-run", "wait", *NODE, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        "pod.sh: 'wait' waits for a queued resource: add --queued (a plain 'create' returns once the TPU VM is up)"
    )


def test_pod_plan_explicit_topology_and_unknown_type():
    (cmd,) = dry(POD, "plan", "--accelerator-type", "v5p-100", "--topology", "v5p:2x4x8", "--config", RECIPE)
    assert cmd[cmd.index("--topology") + 1] == "v5p:2x4x8"
    proc = _run(POD, "plan", "--dry-run", "--accelerator-type", "v5p-100", "--config", RECIPE, check=False)
    assert proc.returncode != 0 and "pass --topology" in proc.stderr


@pytest.mark.parametrize(
    ("flags", "capacity"), [(["--spot"], ["--spot"]), (["--preemptible"], ["--preemptible"]), ([], [])]
)
def test_pod_create_tpu_vm(flags, capacity):
    cmds = dry(POD, "create", *NODE, "--accelerator-type", "v5p-128", *flags)
    assert cmds == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", *ZONE]
        + ["--accelerator-type", "v5p-128", "--version", "v2-alpha-tpuv5", *capacity]
    ]


def test_pod_create_queued_spot_then_waits_for_active():
    cmds = dry(POD, "create", *NODE, "--project", "proj", "--accelerator-type", "v5p-128", "--spot", "--queued")
    zp = [*ZONE, "--project", "proj"]
    assert cmds == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu", "--node-id", "my-tpu", *zp]
        + ["--accelerator-type", "v5p-128", "--runtime-version", "v2-alpha-tpuv5", "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "my-tpu", *zp, "--format=value(state.state)"],
    ]


def test_pod_runtime_version_override_and_env_configuration():
    env = {"TPU_NAME": "my-tpu", "ZONE": "us-east5-a", "ACCELERATOR_TYPE": "v6e-64", "SPOT": "1"}
    by_env = dry(POD, "create", env=env)
    assert by_env == dry(POD, "create", *NODE, "--accelerator-type", "v6e-64", "--spot")
    assert by_env[0][by_env[0].index("--version") + 1] == "v2-alpha-tpuv6e"
    (cmd,) = dry(POD, "create", env={**env, "RUNTIME_VERSION": "v2-alpha-tpuv6e-next"})
    assert cmd[cmd.index("--version") + 1] == "v2-alpha-tpuv6e-next"


def test_pod_setup_copies_the_checkout_and_installs():
    cmds = dry(POD, "setup", *NODE, env={"TMPDIR": "/scratch"})
    tarball, files = "/scratch/dgmr-jax-src-my-tpu.tgz", "/scratch/dgmr-jax-src-my-tpu.files"
    assert cmds == [
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", ">", files],
        ["tar", "-C", str(ROOT), "-czf", tarball, "-T", files],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "my-tpu:dgmr-jax-src.tgz", *ZONE, "--worker=all"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", *ZONE, "--worker=all", "--command"]
        + [f"mkdir -p ~/dgmr-jax && tar -xzf ~/dgmr-jax-src.tgz -C ~/dgmr-jax && cd ~/dgmr-jax && {INSTALL}"],
    ]


def test_pod_setup_from_git():
    url = "https://github.com/example/dgmr-jax.git"
    (cmd,) = dry(POD, "setup", *NODE, "--git", url)
    assert cmd[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", *ZONE, "--worker=all", "--command"]
    assert cmd[-1] == (
        "if [ -d ~/dgmr-jax/.git ]; then git -C ~/dgmr-jax pull -q --ff-only; "
        f"else git clone -q {url} ~/dgmr-jax; fi && cd ~/dgmr-jax && {INSTALL}"
    )
    (cmd,) = dry(POD, "setup", *NODE, "--git", url, "--git-ref", "v1.0")
    assert cmd[-1] == (
        "if [ -d ~/dgmr-jax/.git ]; then git -C ~/dgmr-jax fetch -q origin; "
        f"else git clone -q {url} ~/dgmr-jax; fi && git -C ~/dgmr-jax checkout -q v1.0 && cd ~/dgmr-jax && {INSTALL}"
    )


def test_pod_launch_distill_on_every_worker():
    (cmd,) = dry(POD, "launch", *NODE, "--config", RECIPE, "--workdir", "gs://b/run")
    assert cmd[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", *ZONE, "--worker=all", "--command"]
    assert cmd[-1] == (
        'cd ~/dgmr-jax && export PATH="$HOME/.local/bin:$PATH" && (nohup env '
        f"DGMR_TPU_POD=1 dgmr-jax distill --config {RECIPE} --workdir gs://b/run"
        " >> ~/dgmr-distill.log 2>&1 < /dev/null &)"
    )
    (cmd,) = dry(POD, "launch", *NODE, "--config", RECIPE, "--workdir", "gs://b/run", "--", TRICKY, QUOTED)
    words = shlex.split(cmd[-1])  # what the worker's shell hands dgmr-jax: each override one word, intact
    assert words[words.index("--workdir") :][:5] == ["--workdir", "gs://b/run", TRICKY, QUOTED, ">>"]


@pytest.mark.parametrize("workdir", ["runs/x", "/shared/run", "gs://", "s3://b/run"])
@pytest.mark.parametrize("command", ["launch", "all"])
def test_pod_refuses_a_workdir_off_gcs(command, workdir):
    args = [command, "--dry-run", *NODE, "--accelerator-type", "v5p-128", "--config", RECIPE, "--workdir", workdir]
    proc = _run(POD, *args, check=False)
    assert proc.returncode != 0
    assert proc.stdout == ""  # nothing printed, so nothing would have run
    assert f"must be a gs:// path on a TPU pod, got '{workdir}'" in proc.stderr


def test_pod_logs_status_delete():
    assert dry(POD, "logs", *NODE) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", *ZONE, "--worker=0"]
        + ["--command", "tail -n 200 -F ~/dgmr-distill.log"]
    ]
    assert dry(POD, "logs", *NODE, "--worker", "3")[0][-3] == "--worker=3"
    assert dry(POD, "status", *NODE) == [["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu", *ZONE]]
    assert dry(POD, "status", *NODE, "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "my-tpu", *ZONE]
    ]
    assert dry(POD, "delete", *NODE) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", *ZONE, "--quiet"]]
    assert dry(POD, "delete", *NODE, "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu", *ZONE, "--force", "--quiet"]
    ]


def test_pod_all_is_plan_create_setup_launch_logs():
    args = ["all", *NODE, "--accelerator-type", "v5p-128", "--spot", "--config", RECIPE, "--workdir", "gs://b/run"]
    cmds = dry(POD, *args, "--", TRICKY)
    assert cmds[0] == ["dgmr-jax", "plan", "--config", RECIPE, "--topology", "v5p:4x4x4", TRICKY]
    assert cmds[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and "--spot" in cmds[1]
    assert [c[0] for c in cmds[2:4]] == ["git", "tar"]
    assert cmds[4][4] == "scp"
    assert INSTALL in cmds[5][-1]
    assert f"DGMR_TPU_POD=1 dgmr-jax distill --config {RECIPE} --workdir gs://b/run" in cmds[6][-1]
    assert cmds[7][-1] == "tail -n 200 -F ~/dgmr-distill.log"
    assert len(cmds) == 8
    assert dry(POD, *args, "--skip-plan", "--", TRICKY) == cmds[1:]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "--zone", "z", "--accelerator-type", "v5p-8"], "--name [TPU_NAME] is required"),
        (["create", "--name", "n", "--accelerator-type", "v5p-8"], "--zone [ZONE] is required"),
        (["create", *NODE], "--accelerator-type [ACCELERATOR_TYPE] is required"),
        (["create", *NODE, "--accelerator-type", "v5p-8", "--spot", "--preemptible"], "exclude each other"),
        (["create", *NODE, "--accelerator-type", "v5p-8", "--queued", "--preemptible"], "take --spot"),
        (["create", *NODE, "--accelerator-type", "tpu9-8"], "pass --version"),
        (["launch", *NODE, "--workdir", "gs://b/run"], "--config [CONFIG] is required"),
        (["launch", *NODE, "--config", RECIPE], "--workdir gs://BUCKET/RUN [WORKDIR] is required"),
        (["teleport", *NODE], "unknown command 'teleport'"),
        (["launch", "--bogus"], "unknown option --bogus"),
    ],
)
def test_pod_refusals(args, message):
    proc = _run(POD, "--dry-run", *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert proc.stdout == ""


def test_pod_help_and_no_command():
    assert "usage: tpu_scripts/pod.sh COMMAND" in _run(POD, "-h").stdout
    proc = _run(POD, check=False)
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.fixture
def fake_pod(tmp_path):
    """A fake gcloud that runs `tpu-vm ssh --command` here (HOME is the one worker's home), copies `scp`
    into that home and answers queued-resource describes from a list; a fake python3 (pip) and dgmr-jax."""
    home, bin_dir = tmp_path / "worker", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    (home / ".local" / "bin").mkdir(parents=True)
    calls, states = tmp_path / "gcloud_calls.jsonl", tmp_path / "states"
    _fake(
        bin_dir / "gcloud",
        f"""import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    sys.exit(subprocess.run(["bash", "-c", args[args.index("--command") + 1]]).returncode)
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(args[4], os.path.join(os.environ["HOME"], args[5].split(":", 1)[1]))
if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    lines = open({str(states)!r}).read().split()
    print(lines.pop(0))
    open({str(states)!r}, "w").write("\\n".join(lines))
""",
    )
    record = """import json, os, sys
with open(os.path.join(os.environ["HOME"], "record-" + os.path.basename(sys.argv[0]) + ".json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "pod": os.environ.get("DGMR_TPU_POD")}, f)
"""
    _fake(bin_dir / "python3", record)
    _fake(home / ".local" / "bin" / "dgmr-jax", record)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}

    def gcloud_calls():
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return home, env, gcloud_calls, states


def test_pod_dry_run_runs_nothing(fake_pod, tmp_path):
    home, env, gcloud_calls, _ = fake_pod
    args = ["all", *NODE, "--accelerator-type", "v5p-128", "--config", RECIPE, "--workdir", "gs://b/run"]
    _run(POD, "--dry-run", *args, "--skip-plan", env=env, home=home)
    assert gcloud_calls() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "worker"]  # no tarball either


def test_pod_launch_starts_distill_in_the_background(fake_pod):
    home, env, gcloud_calls, _ = fake_pod
    (home / "dgmr-jax").mkdir()
    args = ["launch", *NODE, "--config", RECIPE, "--workdir", "gs://b/run", "--", TRICKY, QUOTED]
    start = time.monotonic()
    _run(POD, *args, env=env, home=home)
    assert time.monotonic() - start < 20  # the ssh command returns; distill keeps running under nohup
    record = home / "record-dgmr-jax.json"
    for _ in range(100):
        if record.exists() and record.stat().st_size:
            break
        time.sleep(0.1)
    got = json.loads(record.read_text())
    assert got == {
        "argv": ["distill", "--config", RECIPE, "--workdir", "gs://b/run", TRICKY, QUOTED],
        "cwd": str(home / "dgmr-jax"),
        "pod": "1",
    }
    assert (home / "dgmr-distill.log").exists()
    assert len(gcloud_calls()) == 1


def test_pod_setup_ships_the_working_tree_and_installs(fake_pod):
    home, env, gcloud_calls, _ = fake_pod
    _run(POD, "setup", *NODE, env=env, home=home)
    checkout = home / "dgmr-jax"
    assert (checkout / "tpu_scripts" / "pod.sh").read_bytes() == POD.read_bytes()
    assert (checkout / "pyproject.toml").exists() and (checkout / "constraints.txt").exists()
    assert not (checkout / ".git").exists()
    pip = json.loads((home / "record-python3.json").read_text())
    assert pip["argv"] == ["-m", "pip", "install", "-q", "-c", "constraints.txt", "-e", ".[gcs]", "jax[tpu]"]
    assert pip["cwd"] == str(checkout)
    assert [c[3] for c in gcloud_calls()] == ["scp", "ssh"]


def test_pod_setup_ships_tracked_files_as_edited_and_leaves_big_untracked_ones_out(fake_pod, tmp_path):
    """In a checkout with an uncommitted edit, a file deleted in the working tree, an ignored folder, a new
    untracked recipe and an untracked 2 MiB file, setup ships the tracked files as they are in the working tree
    and the small untracked file; the big one stays here, named in one line."""
    home, env, _, _ = fake_pod
    repo = tmp_path / "repo"
    (repo / "tpu_scripts").mkdir(parents=True)
    shutil.copy(POD, repo / "tpu_scripts" / "pod.sh")
    for name in ("kept.py", "edited.py", "deleted.py"):
        (repo / name).write_text(f"{name} as committed\n")
    (repo / ".gitignore").write_text("/ignored/\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "x"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    (repo / "edited.py").write_text("edited, not committed\n")
    (repo / "deleted.py").unlink()
    (repo / "ignored").mkdir()
    (repo / "ignored" / "checkpoint.bin").write_bytes(b"0" * 100)
    (repo / "configs").mkdir()
    (repo / "configs" / "mine.py").write_text("new recipe\n")
    (repo / "data").mkdir()
    (repo / "data" / "shard.array_record").write_bytes(b"\0" * (2 * 1024 * 1024 + 1))

    proc = _run(repo / "tpu_scripts" / "pod.sh", "setup", *NODE, env=env, home=home)
    checkout = home / "dgmr-jax"
    shipped = sorted(str(p.relative_to(checkout)) for p in checkout.rglob("*") if p.is_file())
    assert shipped == [".gitignore", "configs/mine.py", "edited.py", "kept.py", "tpu_scripts/pod.sh"]
    assert (checkout / "edited.py").read_text() == "edited, not committed\n"
    notes = [line for line in proc.stderr.splitlines() if line.startswith("pod.sh:")]
    assert notes == [
        "pod.sh: setup leaves out 1 untracked file(s) over 1024 KiB: data/shard.array_record (2 MiB) "
        "(git add what the workers need; .gitignore the rest)"
    ]


def test_pod_create_with_a_service_account():
    """--service-account goes to both create forms with the cloud-platform scope (its IAM roles decide)."""
    identity = ["--service-account", "sa@p.iam.gserviceaccount.com", "--scopes"]
    identity.append("https://www.googleapis.com/auth/cloud-platform")
    sa = ["--service-account", "sa@p.iam.gserviceaccount.com"]
    (cmd,) = dry(POD, "create", *NODE, "--accelerator-type", "v5p-8", *sa)
    assert cmd[-len(identity) :] == identity and cmd[4] == "create"
    cmds = dry(POD, "create", *NODE, "--accelerator-type", "v5p-8", "--spot", "--queued", *sa)
    assert cmds[0][3:5] == ["queued-resources", "create"] and cmds[0][-len(identity) - 1 :] == ["--spot", *identity]
    env = {"TPU_NAME": "my-tpu", "ZONE": "us-east5-a", "SERVICE_ACCOUNT": "sa@p.iam.gserviceaccount.com"}
    assert dry(POD, "create", "--accelerator-type", "v5p-8", env=env) == [cmd]


def test_pod_create_queued_waits_until_active(fake_pod):
    home, env, gcloud_calls, states = fake_pod
    args = ["create", *NODE, "--accelerator-type", "v5p-128", "--spot", "--queued"]
    states.write_text("WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n")
    proc = _run(POD, *args, env={**env, "POLL_SECONDS": "0"}, home=home)
    assert [c[2:4] for c in gcloud_calls()] == [["queued-resources", "create"]] + [["queued-resources", "describe"]] * 3
    assert "WAITING_FOR_RESOURCES" in proc.stderr and "is ACTIVE" in proc.stderr

    states.write_text("WAITING_FOR_RESOURCES\nFAILED\n")
    proc = _run(POD, *args, env={**env, "POLL_SECONDS": "0"}, home=home, check=False)
    assert proc.returncode != 0 and "queued resource my-tpu is FAILED" in proc.stderr


# ----------------------------------------------------------------------------------- gpu_cluster.sh

SLURM = {"SLURM_JOB_NODELIST": "gpu-a[01-04]", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "4242"}


@pytest.fixture
def fake_slurm(tmp_path):
    """Fake scontrol (expands the node list), srun (runs its command once per task with SLURM_PROCID) and
    dgmr-jax (records its argv and DGMR_* env per process)."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    _fake(
        bin_dir / "scontrol",
        """import sys
assert sys.argv[1:] == ["show", "hostnames", "gpu-a[01-04]"], sys.argv
print("gpu-a01\\ngpu-a02\\ngpu-a03\\ngpu-a04")
""",
    )
    _fake(
        bin_dir / "srun",
        """import os, subprocess, sys
args = sys.argv[1:]
ntasks = int(next(a for a in args if a.startswith("--ntasks="))[len("--ntasks="):])
while args[0].startswith("--"):
    args.pop(0)
for i in range(ntasks):
    subprocess.run(args, env={**os.environ, "SLURM_PROCID": str(i)}, check=True)
""",
    )
    _fake(
        bin_dir / "dgmr-jax",
        f"""import json, os, sys
env = {{k: v for k, v in os.environ.items() if k.startswith("DGMR_")}}
with open(os.path.join({str(out)!r}, "proc-" + env.get("DGMR_PROCESS_ID", "x") + ".json"), "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": env}}, f)
""",
    )
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, out


def test_gpu_env_from_slurm(fake_slurm):
    env, _ = fake_slurm
    proc = _run(GPU, "env", env={**env, **SLURM, "SLURM_PROCID": "2"})
    assert proc.stdout.splitlines() == [
        "DGMR_COORDINATOR=gpu-a01:24242",  # first host, port 20000 + job id % 10000
        "DGMR_NUM_PROCESSES=4",
        "DGMR_PROCESS_ID=2",
    ]
    proc = _run(GPU, "env", env={**env, **SLURM, "SLURM_PROCID": "0", "COORDINATOR_PORT": "1234"})
    assert proc.stdout.splitlines()[0] == "DGMR_COORDINATOR=gpu-a01:1234"
    no_ntasks = {k: v for k, v in SLURM.items() if k != "SLURM_NTASKS"}
    proc = _run(GPU, "env", env={**env, **no_ntasks, "SLURM_JOB_NUM_NODES": "4"})
    assert proc.stdout.splitlines()[1:] == ["DGMR_NUM_PROCESSES=4", "DGMR_PROCESS_ID=0"]


def test_gpu_run_dry_run(fake_slurm):
    env, _ = fake_slurm
    cmds = dry(GPU, "run", "configs/openclip_vit_g14_prune1.py", "/shared/run", TRICKY, env={**env, **SLURM})
    assert cmds == [
        ["export", "DGMR_COORDINATOR=gpu-a01:24242", "DGMR_NUM_PROCESSES=4"],
        ["srun", "--ntasks=4", "--kill-on-bad-exit=1", "bash", "-c"]
        + ['DGMR_PROCESS_ID=$SLURM_PROCID exec dgmr-jax distill "$@"', "dgmr-jax"]
        + ["--config", "configs/openclip_vit_g14_prune1.py", "--workdir", "/shared/run", TRICKY],
    ]


def test_gpu_run_gives_every_task_its_process_id(fake_slurm):
    env, out = fake_slurm
    _run(GPU, "run", "configs/openclip_vit_g14_prune1.py", "/shared/run", TRICKY, QUOTED, env={**env, **SLURM})
    for i in range(4):
        got = json.loads((out / f"proc-{i}.json").read_text())
        assert got["argv"] == ["distill", "--config", "configs/openclip_vit_g14_prune1.py"] + [
            "--workdir",
            "/shared/run",
            TRICKY,
            QUOTED,
        ]
        assert got["env"] == {
            "DGMR_COORDINATOR": "gpu-a01:24242",
            "DGMR_NUM_PROCESSES": "4",
            "DGMR_PROCESS_ID": str(i),
        }
    assert sorted(p.name for p in out.iterdir()) == [f"proc-{i}.json" for i in range(4)]


def test_gpu_submit_dry_run():
    cmds = dry(GPU, "submit", "--nodes", "4", "--time", "24:00:00", "--partition", "gpu", RECIPE, "/shared/run", TRICKY)
    assert cmds == [
        ["sbatch", "--nodes=4", "--gpus-per-node=8", "--time=24:00:00", "--partition=gpu", str(GPU), "run"]
        + [RECIPE, "/shared/run", TRICKY]
    ]
    sbatch_header = [line for line in GPU.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in sbatch_header


def test_gpu_node_without_scheduler(fake_slurm):
    env, out = fake_slurm
    manual = {**env, "COORDINATOR": "node0:1234", "NUM_NODES": "2", "NODE_RANK": "1"}
    assert dry(GPU, "node", RECIPE, "/shared/run", env=manual) == [
        ["env", "DGMR_COORDINATOR=node0:1234", "DGMR_NUM_PROCESSES=2", "DGMR_PROCESS_ID=1"]
        + ["dgmr-jax", "distill", "--config", RECIPE, "--workdir", "/shared/run"]
    ]
    _run(GPU, "node", RECIPE, "/shared/run", env=manual)
    got = json.loads((out / "proc-1.json").read_text())
    assert got["env"] == {"DGMR_COORDINATOR": "node0:1234", "DGMR_NUM_PROCESSES": "2", "DGMR_PROCESS_ID": "1"}


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["run", RECIPE, "/shared/run"], {}, "not inside a SLURM allocation"),
        (["env"], {}, "not inside a SLURM allocation"),
        (["run", RECIPE], SLURM, "run needs CONFIG WORKDIR"),
        (["node", RECIPE, "/shared/run"], {"NUM_NODES": "2", "NODE_RANK": "0"}, "COORDINATOR=host:port"),
        (["submit", "--bogus", RECIPE, "/w"], {}, "unknown option --bogus"),
        (["launch"], {}, "unknown command 'launch'"),
    ],
)
def test_gpu_refusals(args, env, message):
    proc = _run(GPU, *args, env=env, check=False)
    assert proc.returncode != 0 and message in proc.stderr


def test_gpu_help():
    assert "usage: tpu_scripts/gpu_cluster.sh COMMAND" in _run(GPU, "-h").stdout
    assert _run(GPU, check=False).returncode == 2


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_are_shellcheck_clean():
    proc = subprocess.run(["shellcheck", str(POD), str(GPU)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
