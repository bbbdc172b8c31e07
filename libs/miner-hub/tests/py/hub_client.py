"""Drives the real huggingface_hub (1.10.1, without hf_xet) against HF_ENDPOINT for the fidelity
test. One command per run; prints one JSON object on the last line of stdout."""
import json
import os
import sys

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import huggingface_hub  # noqa: E402
from huggingface_hub import HfApi, hf_hub_download  # noqa: E402
from huggingface_hub.utils._runtime import is_xet_available  # noqa: E402


def out(obj):
    print(json.dumps(obj))


def main(argv):
    cmd = argv[0]
    token = os.environ.get("HF_TOKEN") or None
    api = HfApi(endpoint=os.environ["HF_ENDPOINT"], token=token)
    if cmd == "env":
        out({"version": huggingface_hub.__version__, "xet": bool(is_xet_available())})
    elif cmd == "upload_folder":
        repo, folder = argv[1], argv[2]
        url = api.create_repo(repo, private=False)
        again = api.create_repo(repo, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=folder, commit_message="fidelity upload")
        out({"repo_url": str(url), "again": str(again), "oid": info.oid, "commit_url": info.commit_url})
    elif cmd == "download":
        repo, rev, fname = argv[1], argv[2], argv[3]
        path = hf_hub_download(repo_id=repo, filename=fname, revision=rev, endpoint=os.environ["HF_ENDPOINT"])
        out({"path": os.path.realpath(path)})
    elif cmd == "list":
        repo, rev = argv[1], argv[2]
        files = api.list_repo_files(repo, revision=rev)
        info = api.model_info(repo, revision=rev)
        out({"files": sorted(files), "sha": info.sha, "private": info.private,
             "siblings": sorted(s.rfilename for s in (info.siblings or []))})
    elif cmd == "load_safetensors":
        from safetensors.torch import load_file
        tensors = load_file(argv[1])
        out({k: {"shape": list(v.shape), "sum": float(v.double().sum())} for k, v in tensors.items()})
    elif cmd == "download_error":
        repo, rev, fname = argv[1], argv[2], argv[3]
        try:
            hf_hub_download(repo_id=repo, filename=fname, revision=rev, endpoint=os.environ["HF_ENDPOINT"])
            out({"error": None})
        except Exception as e:  # the class name is what the test compares
            out({"error": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__]})
    elif cmd == "upload_error":
        repo, folder = argv[1], argv[2]
        try:
            api.upload_folder(repo_id=repo, folder_path=folder)
            out({"error": None})
        except Exception as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            out({"error": type(e).__name__, "status": status})
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
