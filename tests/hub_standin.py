"""A stand-in for the Hugging Face Hub on 127.0.0.1, speaking the part of its HTTP API that `create_repo` and
`upload_folder` use (huggingface_hub 1.x/2.x): POST /api/repos/create, POST /api/validate-yaml (model card
metadata, always valid here), POST /api/models/ID/preupload/REV (every file
is answered "regular", so the commit carries the contents and no LFS/Xet transfer is needed) and
POST /api/models/ID/commit/REV (an NDJSON commit). Point a subprocess at it with HF_ENDPOINT=hub.url."""

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStandIn:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id -> path -> contents, as committed
        self.requests: list[tuple[str, str, str]] = []  # (method, path, authorization header)
        self.commits: list[tuple[str, str]] = []  # (repo id, commit message)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(("POST", self.path.split("?")[0], self.headers.get("Authorization", "")))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = (
                        f"{payload['organization']}/{payload['name']}"
                        if payload.get("organization")
                        else payload["name"]
                    )
                    hub.repos.setdefault(repo_id, {})
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/]+)", path)
                if match is None or match.group(1) not in hub.repos:
                    return self._reply(404, {"error": f"not handled by the stand-in: POST {path}"})
                repo_id, action = match.group(1), match.group(2)
                if action == "preupload":
                    files = json.loads(body)["files"]
                    uploads = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._reply(200, {"files": uploads})
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        hub.commits.append((repo_id, item["value"]["summary"]))
                    elif item["key"] == "file":
                        hub.repos[repo_id][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    else:
                        return self._reply(400, {"error": f"the stand-in does not handle {item['key']}"})
                return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{'0' * 40}", "commitOid": "0" * 40,
                                         "pullRequestUrl": None})

            def do_GET(self):
                hub.requests.append(("GET", self.path.split("?")[0], self.headers.get("Authorization", "")))
                self._reply(404, {"error": f"not handled by the stand-in: GET {self.path}"})

            do_PUT = do_DELETE = do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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
