"""A stand-in for the Hugging Face Hub on 127.0.0.1, speaking the part of its HTTP API that `create_repo` and
`upload_folder` use (huggingface_hub 1.x/2.x) for models and Spaces: POST /api/repos/create (the repository's type and
a Space's SDK kept in `kinds`), POST /api/validate-yaml (model card metadata, always valid here),
POST /api/{models,spaces}/ID/preupload/REV (a file over 10 MB is answered "lfs", as the Hub stores it, every other one
"regular", so the commit carries its contents), the Git LFS batch API that huggingface_hub uses with Xet off
(POST [spaces/]ID.git/info/lfs/objects/batch, then a PUT of the file to the address it gives) and
POST /api/{models,spaces}/ID/commit/REV (an NDJSON commit). Point a subprocess at it with HF_ENDPOINT=hub.url."""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


LFS_THRESHOLD = 10 * 1000 * 1000  # the Hub keeps larger files in LFS (Xet) storage, not in Git


class HubStandIn:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id -> path -> contents, as committed
        self.kinds: dict[str, tuple[str, str | None]] = {}  # repo id -> (type: model or space, a Space's sdk)
        self.lfs_paths: set[tuple[str, str]] = set()  # (repo id, path) of the files committed as LFS pointers
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> contents, as PUT
        self.requests: list[tuple[str, str, str]] = []  # (method, path, authorization header)
        self.commits: list[tuple[str, str]] = []  # (repo id, commit message)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def env(self, token: str = "hf_standin_token") -> dict:
        """Environment for a subprocess that talks to this stand-in instead of huggingface.co."""
        return {"HF_ENDPOINT": self.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


class _Handler(BaseHTTPRequestHandler):
    """The requests of one HubStandIn (`self.server.hub`)."""

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _received(self) -> tuple[str, bytes]:
        """The request's path, without its query, and body; the request noted in hub.requests."""
        path = self.path.split("?")[0]
        self.server.hub.requests.append((self.command, path, self.headers.get("Authorization", "")))
        return path, self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_POST(self):
        hub = self.server.hub
        path, body = self._received()
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = "/".join(filter(None, (payload.get("organization"), payload["name"])))
            hub.repos.setdefault(repo_id, {})
            hub.kinds.setdefault(repo_id, (payload.get("type") or "model", payload.get("sdk")))
            return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if re.fullmatch(r"/(spaces/)?(.+)\.git/info/lfs/objects/batch", path):
            objects = [{"oid": o["oid"], "size": o["size"],
                        "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}}
                       for o in json.loads(body)["objects"]]
            return self._reply(200, {"transfer": "basic", "objects": objects})
        match = re.fullmatch(r"/api/(models|spaces)/(.+)/(preupload|commit)/([^/]+)", path)
        if match is None or hub.kinds.get(match.group(2), ("",))[0] + "s" != match.group(1):
            return self._reply(404, {"error": f"not handled by the stand-in: POST {path}"})
        repo_id, action = match.group(2), match.group(3)
        if action == "preupload":
            uploads = [{"path": f["path"], "uploadMode": "lfs" if f["size"] > LFS_THRESHOLD else "regular",
                        "shouldIgnore": False} for f in json.loads(body)["files"]]
            return self._reply(200, {"files": uploads})
        return self._commit(repo_id, body)

    def _commit(self, repo_id: str, body: bytes):
        hub = self.server.hub
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                hub.commits.append((repo_id, item["value"]["summary"]))
            elif item["key"] == "file":
                hub.repos[repo_id][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "lfsFile" and item["value"]["oid"] in hub.lfs_objects:
                hub.repos[repo_id][item["value"]["path"]] = hub.lfs_objects[item["value"]["oid"]]
                hub.lfs_paths.add((repo_id, item["value"]["path"]))
            else:
                return self._reply(400, {"error": f"the stand-in does not handle {item}"[:300]})
        return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{'0' * 40}", "commitOid": "0" * 40,
                                 "pullRequestUrl": None})

    def do_PUT(self):
        path, body = self._received()
        match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if match is None:
            return self._reply(404, {"error": f"not handled by the stand-in: PUT {path}"})
        if hashlib.sha256(body).hexdigest() != match.group(1):
            return self._reply(400, {"error": "the upload's sha256 is not the one announced"})
        self.server.hub.lfs_objects[match.group(1)] = body
        return self._reply(200, {})

    def do_GET(self):
        self._received()
        self._reply(404, {"error": f"not handled by the stand-in: {self.command} {self.path}"})

    do_DELETE = do_HEAD = do_GET
