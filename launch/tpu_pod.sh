#!/usr/bin/env bash
# Runs one command on every worker (host) of a Cloud TPU VM slice, one soraax process per host.
#
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#       python -m soraax.train --config configs/dit_xl.py --workdir /mnt/shared/runs/xl
#
# First it puts the code on every worker and installs it (SETUP=1, the default): this checkout's files
# (or a git clone of REPO_URL) into REMOTE_DIR, a virtual environment there, and `pip install -e ".[tpu]"`.
# Then it runs the command in REMOTE_DIR on all workers at once, through
# `gcloud compute tpus tpu-vm ssh --worker=all`. Each process finds its peers itself:
# soraax.distributed.initialize sees the TPU chips and calls jax.distributed.initialize(), which reads the
# slice's topology from the TPU VM metadata. --workdir must be storage every worker sees (Filestore/NFS,
# or a gcsfuse mount of a bucket): Orbax writes each host's shards of a checkpoint there.
#
# Environment:
#   TPU             (required) the TPU VM's name, as in `gcloud compute tpus tpu-vm create NAME`
#   ZONE            (required) its zone
#   PROJECT         its project (default: gcloud's configured project)
#   REPO_URL        a git URL to clone on each worker; unset: copy this checkout (tracked files and
#                   untracked ones git does not ignore)
#   REPO_REF        with REPO_URL: the branch, tag or commit to run (default: main)
#   REMOTE_DIR      where the code goes on each worker, relative to the remote home (default: soraax)
#   PYTHON_VERSION  the venv's Python (default: 3.11; soraax needs >= 3.11 and TPU VM images ship 3.10,
#                   so the venv is made with uv, which fetches this Python)
#   SETUP           1 (default): copy or clone, make the venv, install, then run; 0: run only
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name, e.g. TPU=my-v5p-64}"
: "${ZONE:?set ZONE to the TPU VM zone, e.g. ZONE=us-east5-a}"
REPO_REF="${REPO_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-soraax}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
SETUP="${SETUP:-1}"
if (($# == 0)); then
  echo "usage: TPU=NAME ZONE=ZONE $0 COMMAND [ARG ...]   (e.g. python -m soraax.train --config ... --workdir ...)" >&2
  exit 2
fi

gcloud_flags=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_flags+=(--project="$PROJECT")
fi

# Single quotes any POSIX shell reads back (printf %q may write bash's $'...' for a newline).
sh_quote() {
  printf "'%s'" "${1//\'/\'\\\'\'}"
}

# Runs a bash script on every worker at once (under bash, whatever the login shell); fails if any fails.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU" "${gcloud_flags[@]}" --worker=all \
    --command="bash -c $(sh_quote "set -euo pipefail; $1")"
}

dir=$(printf '%q' "$REMOTE_DIR")

if [[ "$SETUP" == 1 ]]; then
  if [[ -n "${REPO_URL:-}" ]]; then
    # Fetching the ref by name works alike for a branch, a tag or a commit.
    on_all_workers "[[ -d $dir/.git ]] || git clone --quiet $(printf '%q' "$REPO_URL") $dir
      git -C $dir fetch --quiet origin $(printf '%q' "$REPO_REF")
      git -C $dir checkout --quiet --detach FETCH_HEAD"
  else
    repo_root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
    staging=$(mktemp -d)
    trap 'rm -rf "$staging"' EXIT
    # Tracked files still on disk and untracked ones git does not ignore: what this checkout would run.
    git -C "$repo_root" ls-files -z --cached --others --exclude-standard \
      | (cd "$repo_root" && while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done) \
      | tar -C "$repo_root" --null -T - -czf "$staging/soraax-code.tar.gz"
    gcloud compute tpus tpu-vm scp "$staging/soraax-code.tar.gz" "$TPU:soraax-code.tar.gz" \
      "${gcloud_flags[@]}" --worker=all
    on_all_workers "mkdir -p $dir && tar -xzf soraax-code.tar.gz -C $dir && rm soraax-code.tar.gz"
  fi
  on_all_workers "if ! command -v uv >/dev/null && [[ ! -x \$HOME/.local/bin/uv ]]; then
        curl -LsSf https://astral.sh/uv/install.sh | sh
      fi
      export PATH=\"\$HOME/.local/bin:\$PATH\"
      cd $dir
      [[ -d .venv ]] || uv venv --python $(printf '%q' "$PYTHON_VERSION") .venv
      uv pip install --python .venv/bin/python --quiet -e '.[tpu]'"
fi

# The same command on every host; `exec` so that a signal from ssh reaches the Python process itself.
on_all_workers "cd $dir && source .venv/bin/activate && exec $(printf '%q ' "$@")"
