# Sourced by scripts/dev, scripts/test and .ci/run (not run on its own):
# make .venv exist and hold this checkout's dependencies, installing only when
# pyproject.toml changed since the last install.
#
# PYTHON picks the interpreter that creates .venv (default: python3, >= 3.11).

dpp_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dpp_venv="$dpp_root/.venv"
dpp_stamp="$dpp_venv/.dpp-install-stamp"

dpp_fail() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}

dpp_ensure_venv() {
    local python="${PYTHON:-python3}"
    if [[ ! -x "$dpp_venv/bin/python" ]]; then
        command -v "$python" >/dev/null 2>&1 \
            || dpp_fail "$python not found; install Python 3.11 or newer (or set PYTHON=/path/to/python3.11)"
        "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || dpp_fail "$python is Python $("$python" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '(unknown version)'), too old: DPP needs 3.11 or newer (set PYTHON=/path/to/python3.11)"
        echo "creating .venv with $("$python" --version 2>&1)" >&2
        "$python" -m venv "$dpp_venv" || dpp_fail "could not create $dpp_venv"
        rm -f "$dpp_stamp"
    fi
    # What the install depends on: the dependency lists (DPP's and the Python
    # client's, installed editable beside it), and the interpreter.
    local wanted
    wanted="$(cat "$dpp_root/pyproject.toml" "$dpp_root/clients/python/pyproject.toml" \
        "$dpp_venv/pyvenv.cfg" | sha256sum | cut -d' ' -f1)"
    if [[ ! -f "$dpp_stamp" || "$(cat "$dpp_stamp")" != "$wanted" ]]; then
        echo "installing dpp, dpp-client and their dependencies into .venv (a pyproject.toml changed)" >&2
        (cd "$dpp_root" && "$dpp_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            -e '.[dev]' -e ./clients/python) \
            || dpp_fail "pip install -e '.[dev]' -e ./clients/python failed (see above)"
        echo "$wanted" >"$dpp_stamp"
    fi
}
