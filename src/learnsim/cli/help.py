"""The ``--help`` pages of the Hydra entry points (``learnsim-train``, ``learnsim-test``).

Hydra's own ``--help`` lists every key of the composed config; a user wants the experiments, the config groups
with their options, and the few keys that are changed all the time. This page is built from the config folder
(:func:`learnsim.cli.config.config_dir`) at call time, so a new experiment or option appears without editing
code. Hydra's page stays available as ``--hydra-help``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["wants_help", "experiments", "config_groups", "render_help"]

_HELP_FLAGS = ("-h", "--help")


def wants_help(argv: Sequence[str]) -> bool:
    """True when the command line asks for this page (``-h`` / ``--help``; not Hydra's ``--hydra-help``)."""
    return any(a in _HELP_FLAGS for a in argv)


def _description(path: Path) -> str:
    """The first sentence of a config file's leading comment (``@package`` directive skipped); without one, what
    its ``defaults`` list builds on (e.g. ``"lcc with metric=lcc"``)."""
    text = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line.startswith("#"):
            if line or text:
                break
            continue
        part = line.lstrip("#").strip()
        if part and not part.startswith("@package"):
            text.append(part)
    if text:
        joined = " ".join(text)
        end = re.search(r"\.(\s|$)", joined)
        return joined[: end.start() + 1] if end else joined
    bases, changes = [], []
    for item in OmegaConf.load(path).get("defaults", []) or []:
        if isinstance(item, str):
            bases.append(item)
        elif OmegaConf.is_dict(item):
            changes += [f"{str(k).split('/')[-1]}={v}" for k, v in item.items()]
    return ("as " + " + ".join(bases) if bases else "") + (", with " + ", ".join(changes) if changes else "")


def experiments(conf: str | Path) -> dict[str, str]:
    """``{name: one-line description}`` of ``conf/experiment/*.yaml``, sorted by name."""
    folder = Path(conf) / "experiment"
    return {p.stem: _description(p) for p in sorted(folder.glob("*.yaml"))}


def config_groups(conf: str | Path, config_name: str) -> dict[str, tuple[list[str], str | None]]:
    """``{group: (options, default option)}`` for every config group folder (``experiment`` and ``hydra`` left
    out); the default is the one the top-level config's ``defaults`` list picks, ``None`` if it picks none."""
    conf = Path(conf)
    top = OmegaConf.load(conf / f"{config_name}.yaml")
    chosen: dict[str, str] = {}
    for item in top.get("defaults", []):
        if OmegaConf.is_dict(item) or isinstance(item, dict):
            for k, v in dict(item).items():
                chosen[str(k).lstrip("+/").removeprefix("override ")] = str(v)
    groups = {}
    for folder in sorted(p for p in conf.iterdir() if p.is_dir()):
        if folder.name in ("experiment", "hydra"):
            continue
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if options:
            groups[folder.name] = (options, chosen.get(folder.name))
    return groups


def _defaults(conf: str | Path, config_name: str, keys: Sequence[str]) -> dict[str, str]:
    """Current values of ``keys`` in the composed default config (``"?"`` when it cannot be composed)."""
    try:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(Path(conf).resolve()), version_base="1.3"):
            cfg = compose(config_name=config_name)
    except Exception:  # the page must print even with a broken config; Hydra reports that on a real run
        return {k: "?" for k in keys}
    out = {}
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if value is None:
            out[key] = "null"
        elif OmegaConf.is_config(value):
            out[key] = str(OmegaConf.to_container(value, resolve=False))
        else:
            out[key] = str(value)
    return out


def render_help(
    prog: str,
    intro: str,
    usage: Sequence[str],
    config_name: str,
    keys: Sequence[tuple[str, str]],
    conf: str | Path | None = None,
    width: int = 110,
) -> str:
    """The help page: ``intro``, usage lines, the experiments, the config groups (default marked ``*``), the
    common keys with their current defaults (``keys``: ``(key, meaning)``; a key naming a group shows its default
    option), and how to see everything else."""
    from learnsim.cli.config import config_dir

    conf = Path(conf or config_dir())
    lines = [intro.strip(), "", "Usage:"]
    lines += [f"  {u}" for u in usage]

    exps = experiments(conf)
    lines += ["", f"Experiments (+experiment=NAME; files in {conf / 'experiment'}):"]
    pad = max((len(n) for n in exps), default=0) + 2
    for name, text in exps.items():
        lines.append(f"  {name:<{pad}}{_clip(text, width - pad - 2)}".rstrip())

    groups = config_groups(conf, config_name)
    lines += ["", "Config groups (GROUP=OPTION; * = default):"]
    pad = max((len(g) for g in groups), default=0) + 2
    for group, (options, default) in groups.items():
        shown = ", ".join(f"{o}*" if o == default else o for o in options)
        lines.append(f"  {group:<{pad}}{shown}")

    values = _defaults(conf, config_name, [k for k, _ in keys if k not in groups])
    lines += ["", "Keys you will change (KEY=VALUE; current default in brackets):"]
    pad = max((len(k) for k, _ in keys), default=0) + 2
    for key, meaning in keys:
        now = groups[key][1] if key in groups else values.get(key)
        lines.append(f"  {key:<{pad}}{meaning} [{now}]")

    lines += [
        "",
        "More:",
        f"  {prog} [overrides] --cfg job      print the composed config (every key) and exit",
        f"  {prog} --hydra-help               Hydra's own options (multirun -m, --config-dir, ...)",
        "  an unknown key stops with an error naming it; add a new one with +KEY=VALUE",
    ]
    return "\n".join(lines) + "\n"


def _clip(text: str, n: int) -> str:
    text = re.sub(r"\s+", " ", text)
    return text if len(text) <= n else text[: max(n - 3, 0)] + "..."


def version_line(prog: str) -> str:
    """``"<prog> <learnsim version>"``: what every CLI's ``--version`` prints."""
    from learnsim import __version__

    return f"{prog} {__version__}"


def with_version(argv: list[str]) -> list[str]:
    """``argv`` with ``+learnsim_version=<version>`` added (once: a DDP process started with the parent's command
    line, or a user who set it, keeps what is there), so that the run's config records the package version."""
    from learnsim import __version__

    if any(a.lstrip("+~").startswith("learnsim_version=") for a in argv):
        return argv
    return [*argv, f"+learnsim_version='{__version__}'"]  # quoted: a version like 1.0 stays a string


def cli_entry(hydra_main: Callable[[], None], help_text: Callable[[], str]) -> Callable[[], None]:
    """A Hydra CLI's console-script entry point: ``--help`` prints learnsim's page (experiments, groups, keys),
    anything else goes to Hydra."""

    def main() -> None:
        if wants_help(sys.argv[1:]):
            print(help_text(), end="")
            return
        if sys.argv[1:] == ["--version"]:
            print(version_line(Path(sys.argv[0]).name))
            return
        from learnsim.cli.run_dir import with_run_dir_callback
        from learnsim.interrupt import interrupt_status, sigterm_as_interrupt

        # a run folder of its own, also for runs started in the same second (learnsim.cli.run_dir); the
        # package version in the run's config (.hydra/config.yaml: learnsim_version)
        sys.argv = [sys.argv[0], *with_version(with_run_dir_callback(sys.argv[1:]))]
        try:
            with sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C (learnsim.interrupt)
                hydra_main()
        except KeyboardInterrupt as exc:  # outside the task (composing the config): no traceback either
            print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr)
            raise SystemExit(interrupt_status(exc)) from None

    return main
