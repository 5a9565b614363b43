"""The Hugging Face Hub side of `alpaca export --push-to-hub`: what the push needs (checked before any work), and the
upload of a finished export, with messages that never show the token."""

from __future__ import annotations

from alpaca_cli import io
from alpaca_cli.config import ExportConfig
from alpaca_cli.core.export_folder import EXPORT_MARKER
from alpaca_cli.errors import AlpacaError, ConfigError, first_line
from alpaca_cli.rundir import RunDir


def resolve_token(cfg: ExportConfig) -> str | None:
    """With --push-to-hub, what the push needs, checked before any work: a --repo-id the Hub accepts (by
    huggingface_hub's own validator), the Hub not switched off (HF_HUB_OFFLINE), and a token (HF_TOKEN or the
    huggingface_hub login), which it returns."""
    if not cfg.push_to_hub:
        return None
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if cfg.repo_id is not None:
        try:
            validate_repo_id(cfg.repo_id)
        except HFValidationError as e:
            reason = str(e).split(f": '{cfg.repo_id}'")[0]  # huggingface_hub's sentence, without the id repeated
            raise ConfigError(f"--repo-id {cfg.repo_id!r} is not a Hub repo id: {reason}",
                              hint="give NAMESPACE/NAME (e.g. YOU/llama2-alpaca), or NAME for your own namespace")
    if constants.HF_HUB_OFFLINE:
        raise ConfigError("--push-to-hub: the Hub cannot be reached, offline mode is on (HF_HUB_OFFLINE=1)",
                          hint="unset HF_HUB_OFFLINE to push, or export without --push-to-hub")
    token = get_token()
    if not token:
        raise ConfigError(
            "--push-to-hub needs a Hugging Face token",
            hint="set HF_TOKEN, or run `huggingface-cli login` (the token is never written anywhere by alpaca)",
        )
    return token


def push(folder: str, run: RunDir, cfg: ExportConfig, token: str | None,
         export_dir: str) -> tuple[str, str, str | None]:
    """Create the repo if needed and upload the folder (the export, already complete at export_dir); returns
    (repo_id, url, commit oid)."""
    import requests
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        repo_id = cfg.repo_id or f"{api.whoami()['name']}/{run.name}"
        url = api.create_repo(repo_id, private=cfg.private, exist_ok=True, repo_type="model")
        if cfg.revision and cfg.revision != "main":
            api.create_branch(repo_id, branch=cfg.revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=folder, repo_id=repo_id, revision=cfg.revision, ignore_patterns=[EXPORT_MARKER],
            commit_message=cfg.commit_message or f"alpaca export of {run.name}",
        )
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise AlpacaError(
            f"upload to the Hub failed ({status}: {_redact(first_line(e, None), token)})",
            hint="check --repo-id, that your token may write there, and your network",
        ) from None
    except (requests.ConnectionError, requests.Timeout, OfflineModeIsEnabled) as e:
        raise AlpacaError(
            _redact(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({_network_reason(e)}); the export "
                    f"itself is complete at {export_dir}", token),
            hint=_push_again_hint(cfg, run, export_dir),
        ) from None
    return repo_id, str(url), getattr(info, "oid", None)


def _network_reason(e: BaseException) -> str:
    """The innermost socket-level reason of a failed request ("Connection refused", "timed out", ...): requests
    wraps it in urllib3's retry and connection errors."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
        todo += [y for y in (*getattr(x, "args", ()), getattr(x, "reason", None), x.__cause__, x.__context__)
                 if isinstance(y, BaseException)]
    return "timed out" if "timed out" in str(e).lower() else type(e).__name__


def _push_again_hint(cfg: ExportConfig, run: RunDir, export_dir: str) -> str:
    if io.is_remote(export_dir):
        return "run this export again with --push-to-hub --overwrite once the Hub can be reached"
    flags = (" --private" if cfg.private else "") + (f" --revision {cfg.revision}" if cfg.revision else "")
    repo = cfg.repo_id or f"YOUR_NAME/{run.name}"
    return (f"once the Hub can be reached, push it with `hf upload {repo} {export_dir} .{flags} --exclude "
            f"{EXPORT_MARKER}`, or run this export again with --overwrite")


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text
