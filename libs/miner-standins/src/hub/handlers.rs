//! Routing and the Hub's JSON/resolve/tree routes, with the Hub's access rules and error headers
//! (`X-Error-Code`, `X-Error-Message`) that huggingface_hub maps to its exception types.
// Handlers return `Result<Response, Response>`: the error side is the HTTP answer itself.
#![allow(clippy::result_large_err)]

use super::store::{self, Entry, RepoKind, StoreError};
use super::{Hub, HubRoute};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Uri, header};
use axum::response::Response;
use base64::Engine;
use futures::StreamExt;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

pub(crate) type HResult = Result<Response, Response>;

/// A request's context.
pub(crate) struct Ctx {
    pub hub: Arc<Hub>,
    pub token: Option<String>,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub method: Method,
    pub cut: Option<u64>,
}

/// What the path names.
#[derive(Debug, Default, Clone)]
pub(crate) struct Target {
    pub kind: Option<RepoKind>,
    pub repo: String,
    pub rev: String,
    pub file: String,
    pub id: String,
    pub part: u64,
}

fn decode(seg: &str) -> String {
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && b[i + 1].is_ascii_hexdigit()
            && b[i + 2].is_ascii_hexdigit()
        {
            let hexval = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            out.push(hexval(b[i + 1]) * 16 + hexval(b[i + 2]));
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Classifies a request path (segments percent-decoded after splitting).
pub(crate) fn parse(method: &Method, path: &str, storage: bool) -> (HubRoute, Target) {
    let segs: Vec<String> = path.split('/').skip(1).map(decode).collect();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let mut t = Target::default();
    let m = method.clone();
    if storage {
        return match (m, s.as_slice()) {
            (Method::PUT, ["upload", id]) => {
                t.id = id.to_string();
                (HubRoute::StoragePut, t)
            }
            (Method::PUT, ["upload", id, "part", n]) => {
                t.id = id.to_string();
                t.part = n.parse().unwrap_or(0);
                (HubRoute::StoragePartPut, t)
            }
            (Method::GET | Method::HEAD, ["blob", sha]) => {
                t.id = sha.to_string();
                (HubRoute::StorageGet, t)
            }
            _ => (HubRoute::Unknown, t),
        };
    }
    match s.as_slice() {
        ["api", "whoami-v2"] => return (HubRoute::WhoAmI, t),
        ["api", "repos", "create"] => return (HubRoute::CreateRepo, t),
        ["lfs-complete", id] => {
            t.id = id.to_string();
            return (HubRoute::LfsComplete, t);
        }
        ["api", kinds @ ("models" | "datasets"), o, n, rest @ ..] => {
            t.kind = Some(if *kinds == "models" {
                RepoKind::Model
            } else {
                RepoKind::Dataset
            });
            t.repo = format!("{o}/{n}");
            let route = match rest {
                [] => {
                    t.rev = "main".into();
                    HubRoute::RepoInfo
                }
                ["revision", rev @ ..] if !rev.is_empty() => {
                    t.rev = rev.join("/");
                    HubRoute::RepoInfo
                }
                ["settings"] => HubRoute::Settings,
                ["preupload", rev @ ..] => {
                    t.rev = rev.join("/");
                    HubRoute::Preupload
                }
                ["commit", rev @ ..] => {
                    t.rev = rev.join("/");
                    HubRoute::Commit
                }
                ["tree", rev, path @ ..] => {
                    t.rev = rev.to_string();
                    t.file = path.join("/");
                    HubRoute::Tree
                }
                _ => HubRoute::Unknown,
            };
            return (route, t);
        }
        _ => {}
    }
    let (kind, rest) = match s.as_slice() {
        ["datasets", rest @ ..] => (RepoKind::Dataset, rest),
        rest => (RepoKind::Model, rest),
    };
    t.kind = Some(kind);
    match rest {
        [o, ngit, "info", "lfs", "objects", op] if ngit.ends_with(".git") => {
            t.repo = format!("{o}/{}", ngit.trim_end_matches(".git"));
            match *op {
                "batch" => (HubRoute::LfsBatch, t),
                "verify" => (HubRoute::LfsVerify, t),
                _ => (HubRoute::Unknown, t),
            }
        }
        [o, n, "resolve", rev, file @ ..] if !file.is_empty() => {
            t.repo = format!("{o}/{n}");
            t.rev = rev.to_string();
            t.file = file.join("/");
            let route = if *method == Method::HEAD {
                HubRoute::ResolveHead
            } else {
                HubRoute::ResolveGet
            };
            (route, t)
        }
        _ => (HubRoute::Unknown, t),
    }
}

pub(crate) fn classify(method: &Method, path: &str, storage: bool) -> HubRoute {
    parse(method, path, storage).0
}

/// A Hub-style error: JSON `{"error"}` plus `X-Error-Code` / `X-Error-Message`.
pub(crate) fn hub_err(status: u16, code: Option<&str>, msg: &str) -> Response {
    let mut r = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            "x-error-message",
            HeaderValue::from_str(msg).unwrap_or(HeaderValue::from_static("error")),
        );
    if let Some(c) = code {
        r = r.header("x-error-code", c);
    }
    r.body(Body::from(json!({"error": msg}).to_string()))
        .unwrap()
}

pub(crate) fn injected(status: u16, retry_after: Option<u64>) -> Response {
    let mut r = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(s) = retry_after {
        r = r.header(header::RETRY_AFTER, s.to_string());
    }
    r.body(Body::from(json!({"error": "injected fault"}).to_string()))
        .unwrap()
}

pub(crate) fn json_resp(status: u16, v: Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

impl Ctx {
    /// The token's `(user, write)`; an unknown token is refused everywhere.
    pub fn user(&self) -> Result<Option<(String, bool)>, Response> {
        let Some(t) = &self.token else {
            return Ok(None);
        };
        match self.hub.tokens.lock().unwrap().get(t) {
            Some(u) => Ok(Some(u.clone())),
            None => Err(hub_err(
                401,
                None,
                "Invalid credentials in Authorization header",
            )),
        }
    }

    fn not_found(anon: bool) -> Response {
        hub_err(
            if anon { 401 } else { 404 },
            Some("RepoNotFound"),
            "Repository not found",
        )
    }

    /// Read access: public repos for all, private ones for the owner only.
    pub fn read_repo(&self, kind: RepoKind, repo: &str) -> Result<(), Response> {
        let user = self.user()?;
        let st = self.hub.store.lock().unwrap();
        let owner = repo.split('/').next().unwrap_or("");
        match st.get(kind, repo) {
            Some(r) if !r.private || user.as_ref().is_some_and(|(u, _)| u == owner) => Ok(()),
            _ => Err(Self::not_found(user.is_none())),
        }
    }

    /// Write access: the owner with a write token.
    pub fn write_repo(&self, kind: RepoKind, repo: &str) -> Result<(), Response> {
        self.read_repo(kind, repo)?;
        let owner = repo.split('/').next().unwrap_or("");
        match self.user()? {
            None => Err(hub_err(401, None, "You must be authenticated to write")),
            Some((_, false)) => Err(hub_err(
                403,
                None,
                "Forbidden: this token has no write access",
            )),
            Some((u, true)) if u != owner => Err(hub_err(
                403,
                None,
                "You don't have the rights to write to this repository",
            )),
            Some(_) => Ok(()),
        }
    }

    pub fn query(&self) -> Vec<(String, String)> {
        self.uri
            .query()
            .and_then(|q| serde_urlencoded::from_str(q).ok())
            .unwrap_or_default()
    }
}

pub(crate) async fn read_json(body: Body, limit: usize) -> Result<Value, Response> {
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| hub_err(413, None, "Payload too large"))?;
    serde_json::from_slice(&bytes).map_err(|e| hub_err(400, None, &format!("invalid JSON: {e}")))
}

/// The one dispatcher.
pub(crate) async fn handle(ctx: &Ctx, route: HubRoute, body: Body) -> HResult {
    let (_, t) = parse(
        &ctx.method,
        ctx.uri.path(),
        matches!(
            route,
            HubRoute::StoragePut | HubRoute::StoragePartPut | HubRoute::StorageGet
        ),
    );
    let kind = t.kind.unwrap_or(RepoKind::Model);
    match (route, &ctx.method) {
        (HubRoute::WhoAmI, &Method::GET) => whoami(ctx),
        (HubRoute::CreateRepo, &Method::POST) => create_repo(ctx, body).await,
        (HubRoute::Settings, &Method::PUT) => settings(ctx, kind, &t.repo, body).await,
        (HubRoute::RepoInfo, &Method::GET) => info(ctx, kind, &t),
        (HubRoute::Preupload, &Method::POST) => preupload(ctx, kind, &t, body).await,
        (HubRoute::Commit, &Method::POST) => commit(ctx, kind, &t, body).await,
        (HubRoute::Tree, &Method::GET) => tree(ctx, kind, &t),
        (HubRoute::LfsBatch, &Method::POST) => super::lfs::batch(ctx, kind, &t, body).await,
        (HubRoute::LfsVerify, &Method::POST) => super::lfs::verify(ctx, kind, &t, body).await,
        (HubRoute::LfsComplete, &Method::POST) => super::lfs::complete(ctx, &t, body).await,
        (HubRoute::ResolveHead | HubRoute::ResolveGet, _) => resolve(ctx, kind, &t).await,
        (HubRoute::StoragePut, _) => super::lfs::put_basic(ctx, &t, body).await,
        (HubRoute::StoragePartPut, _) => super::lfs::put_part(ctx, &t, body).await,
        (HubRoute::StorageGet, _) => storage_get(ctx, &t).await,
        _ => Err(hub_err(
            404,
            None,
            "Sorry, we can't find the page you are looking for.",
        )),
    }
}

fn whoami(ctx: &Ctx) -> HResult {
    let Some((user, write)) = ctx.user()? else {
        return Err(hub_err(401, None, "Invalid username or password."));
    };
    Ok(json_resp(
        200,
        json!({
            "type": "user", "id": format!("id-{user}"), "name": user, "fullname": user, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "stand-in", "role": if write { "write" } else { "read" }}},
        }),
    ))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !s.starts_with(['-', '.'])
}

async fn create_repo(ctx: &Ctx, body: Body) -> HResult {
    let Some((user, write)) = ctx.user()? else {
        return Err(hub_err(
            401,
            None,
            "You must be authenticated to create a repo",
        ));
    };
    let v = read_json(body, 1 << 20).await?;
    let name = v.get("name").and_then(Value::as_str).unwrap_or("");
    let owner = v
        .get("organization")
        .and_then(Value::as_str)
        .unwrap_or(&user)
        .to_string();
    let kind = match v.get("type").and_then(Value::as_str) {
        None | Some("model") => RepoKind::Model,
        Some("dataset") => RepoKind::Dataset,
        Some(_) => return Err(hub_err(400, None, "Unsupported repo type")),
    };
    if !valid_name(name) || !valid_name(&owner) {
        return Err(hub_err(400, None, "Invalid repo name"));
    }
    if !write || owner != user {
        return Err(hub_err(
            403,
            None,
            &format!("You don't have the rights to create a repo under the namespace {owner:?}"),
        ));
    }
    let private = v.get("visibility").and_then(Value::as_str) == Some("private")
        || v.get("private").and_then(Value::as_bool) == Some(true);
    let repo = format!("{owner}/{name}");
    let url = format!("{}/{}{}", ctx.hub.endpoint, kind.url_prefix(), repo);
    if !ctx.hub.store.lock().unwrap().create(kind, &repo, private) {
        return Err(json_resp(
            409,
            json!({"error": "You already created this repo", "url": url}),
        ));
    }
    Ok(json_resp(
        200,
        json!({"url": url, "name": repo, "id": repo}),
    ))
}

async fn settings(ctx: &Ctx, kind: RepoKind, repo: &str, body: Body) -> HResult {
    ctx.write_repo(kind, repo)?;
    let v = read_json(body, 1 << 20).await?;
    let private = match (
        v.get("visibility").and_then(Value::as_str),
        v.get("private").and_then(Value::as_bool),
    ) {
        (Some("private"), _) | (None, Some(true)) => Some(true),
        (Some("public"), _) | (None, Some(false)) => Some(false),
        _ => None,
    };
    let mut st = ctx.hub.store.lock().unwrap();
    if let (Some(p), Some(r)) = (private, st.repos.get_mut(&(kind, repo.to_string()))) {
        r.private = p;
    }
    drop(st);
    Ok(json_resp(200, json!({})))
}

/// Resolves `t.rev` in a readable repo: the commit oid and its files.
fn commit_at(
    ctx: &Ctx,
    kind: RepoKind,
    t: &Target,
) -> Result<(String, bool, std::collections::BTreeMap<String, Entry>), Response> {
    ctx.read_repo(kind, &t.repo)?;
    let st = ctx.hub.store.lock().unwrap();
    let repo = st
        .get(kind, &t.repo)
        .ok_or_else(|| hub_err(404, Some("RepoNotFound"), "Repository not found"))?;
    match repo.resolve(&t.rev) {
        Ok(c) => Ok((c.oid.clone(), repo.private, c.files.clone())),
        Err(_) => Err(hub_err(
            404,
            Some("RevisionNotFound"),
            &format!("Invalid rev id: {}", t.rev),
        )),
    }
}

fn info(ctx: &Ctx, kind: RepoKind, t: &Target) -> HResult {
    let (oid, private, files) = commit_at(ctx, kind, t)?;
    let siblings: Vec<Value> = files.keys().map(|p| json!({"rfilename": p})).collect();
    let mut v = json!({
        "_id": &oid[..24], "id": t.repo, "author": t.repo.split('/').next(), "sha": oid, "private": private,
        "disabled": false, "gated": false, "downloads": 0, "likes": 0, "tags": [],
        "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
        "siblings": siblings, "usedStorage": files.values().map(|e| e.size).sum::<u64>(),
    });
    if kind == RepoKind::Model {
        v["modelId"] = json!(t.repo);
    }
    Ok(json_resp(200, v))
}

async fn preupload(ctx: &Ctx, kind: RepoKind, t: &Target, body: Body) -> HResult {
    ctx.write_repo(kind, &t.repo)?;
    commit_at(ctx, kind, t)?;
    let v = read_json(body, 16 << 20).await?;
    let files = v
        .get("files")
        .and_then(Value::as_array)
        .ok_or_else(|| hub_err(400, None, "files missing"))?;
    let mut out = Vec::new();
    for f in files.iter().take(1000) {
        let path = f.get("path").and_then(Value::as_str).unwrap_or("");
        let size = f.get("size").and_then(Value::as_u64).unwrap_or(0);
        let mode = if ctx.hub.is_lfs(path, size) {
            "lfs"
        } else {
            "regular"
        };
        out.push(json!({"path": path, "uploadMode": mode, "shouldIgnore": false}));
    }
    Ok(json_resp(
        200,
        json!({"files": out, "commitOid": commit_at(ctx, kind, t)?.0}),
    ))
}

fn valid_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 1024
        && !p.chars().any(char::is_control)
        && p.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
}

async fn commit(ctx: &Ctx, kind: RepoKind, t: &Target, body: Body) -> HResult {
    ctx.write_repo(kind, &t.repo)?;
    if t.rev != "main" {
        return Err(hub_err(
            404,
            Some("RevisionNotFound"),
            "only main is writable here",
        ));
    }
    let bytes = axum::body::to_bytes(body, 64 << 20)
        .await
        .map_err(|_| hub_err(413, None, "Payload too large"))?;
    let mut summary = String::new();
    let mut ops = Vec::new();
    for line in bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
    {
        let v: Value = serde_json::from_slice(line)
            .map_err(|e| hub_err(400, None, &format!("bad NDJSON line: {e}")))?;
        let val = v.get("value").cloned().unwrap_or(Value::Null);
        let path = val
            .get("path")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match v.get("key").and_then(Value::as_str) {
            Some("header") => {
                summary = val
                    .get("summary")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            }
            Some("file") => {
                let content = val.get("content").and_then(Value::as_str).unwrap_or("");
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(content)
                    .map_err(|_| hub_err(400, None, "bad base64 content"))?;
                let sha = store::write_blob(&ctx.hub.data, &raw)
                    .map_err(|e| hub_err(500, None, &e.to_string()))?;
                ops.push((
                    path,
                    Some(Entry::new(raw.len() as u64, sha, false, Some(&raw))),
                ));
            }
            Some("lfsFile") => {
                let oid = val
                    .get("oid")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let size = val.get("size").and_then(Value::as_u64).unwrap_or(u64::MAX);
                let on_disk = tokio::fs::metadata(store::blob_path(&ctx.hub.data, &oid))
                    .await
                    .map(|m| m.len())
                    .ok();
                if oid.len() != 64 || on_disk != Some(size) {
                    return Err(hub_err(
                        422,
                        None,
                        &format!("LFS object {oid} of size {size} was not uploaded"),
                    ));
                }
                ops.push((path, Some(Entry::new(size, oid, true, None))));
            }
            Some("deletedFile") => ops.push((path, None)),
            other => {
                return Err(hub_err(
                    400,
                    None,
                    &format!("unsupported commit operation {other:?}"),
                ));
            }
        }
        if !ops.last().is_none_or(|(p, _)| valid_path(p)) {
            return Err(hub_err(400, None, "invalid path in commit"));
        }
    }
    let oid = ctx
        .hub
        .store
        .lock()
        .unwrap()
        .commit(kind, &t.repo, &summary, ops)
        .map_err(|e| match e {
            StoreError::RepoNotFound => hub_err(404, Some("RepoNotFound"), "Repository not found"),
            other => hub_err(400, None, &other.to_string()),
        })?;
    let url = format!(
        "{}/{}{}/commit/{oid}",
        ctx.hub.endpoint,
        kind.url_prefix(),
        t.repo
    );
    Ok(json_resp(
        200,
        json!({"success": true, "commitOid": oid, "commitUrl": url, "pullRequestUrl": null}),
    ))
}

fn tree(ctx: &Ctx, kind: RepoKind, t: &Target) -> HResult {
    let (_, _, files) = commit_at(ctx, kind, t)?;
    let q = ctx.query();
    let get = |k: &str| q.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    let recursive = matches!(get("recursive").as_deref(), Some("true" | "True" | "1"));
    let cursor: usize = get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
    let prefix = t.file.trim_matches('/');
    let under = |p: &str| prefix.is_empty() || p.starts_with(&format!("{prefix}/"));
    let mut dirs = std::collections::BTreeSet::new();
    let mut entries = Vec::new();
    for (p, e) in files.iter().filter(|(p, _)| under(p)) {
        let rel = if prefix.is_empty() {
            p.as_str()
        } else {
            &p[prefix.len() + 1..]
        };
        let base = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        let parts: Vec<&str> = rel.split('/').collect();
        let depth = if recursive {
            parts.len() - 1
        } else {
            parts.len().min(2) - 1
        };
        for d in 1..=depth {
            dirs.insert(format!("{base}{}", parts[..d].join("/")));
        }
        if recursive || parts.len() == 1 {
            let mut v = json!({"type": "file", "oid": e.git_oid, "size": e.size, "path": p});
            if e.lfs {
                v["lfs"] = json!({"oid": e.sha256, "size": e.size, "pointerSize": store::lfs_pointer(&e.sha256, e.size).len()});
            }
            entries.push((p.clone(), v));
        }
    }
    if !prefix.is_empty() && entries.is_empty() && dirs.is_empty() {
        return Err(hub_err(
            404,
            Some("EntryNotFound"),
            &format!("{prefix} does not exist on {}", t.rev),
        ));
    }
    for d in dirs {
        let oid = store::git_blob_oid(d.as_bytes());
        entries.push((
            d.clone(),
            json!({"type": "directory", "oid": oid, "size": 0, "path": d}),
        ));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let page = ctx.hub.opts.tree_page_size.max(1);
    let end = (cursor + page).min(entries.len());
    let items: Vec<Value> = entries
        .get(cursor..end)
        .unwrap_or(&[])
        .iter()
        .map(|(_, v)| v.clone())
        .collect();
    let mut resp = json_resp(200, Value::Array(items));
    if end < entries.len() {
        let mut q2: Vec<(String, String)> = q.into_iter().filter(|(k, _)| k != "cursor").collect();
        q2.push(("cursor".into(), end.to_string()));
        let link = format!(
            "<{}{}?{}>; rel=\"next\"",
            ctx.hub.endpoint,
            ctx.uri.path(),
            serde_urlencoded::to_string(&q2).unwrap_or_default()
        );
        resp.headers_mut()
            .insert(header::LINK, HeaderValue::from_str(&link).unwrap());
    }
    Ok(resp)
}

async fn resolve(ctx: &Ctx, kind: RepoKind, t: &Target) -> HResult {
    let (oid, _, files) = commit_at(ctx, kind, t)?;
    let Some(e) = files.get(&t.file) else {
        return Err(hub_err(
            404,
            Some("EntryNotFound"),
            &format!("{} does not exist at {}", t.file, t.rev),
        ));
    };
    if e.lfs {
        let loc = format!("{}/blob/{}", ctx.hub.storage, e.sha256);
        let body = format!("Found. Redirecting to {loc}");
        let r = Response::builder()
            .status(302)
            .header(header::LOCATION, &loc)
            .header("x-repo-commit", &oid)
            .header("x-linked-etag", format!("\"{}\"", e.sha256))
            .header("x-linked-size", e.size.to_string())
            .header(header::ETAG, format!("\"{}\"", e.git_oid))
            .header(header::CONTENT_LENGTH, body.len().to_string());
        return Ok(r
            .body(if ctx.method == Method::HEAD {
                Body::empty()
            } else {
                Body::from(body)
            })
            .unwrap());
    }
    let mut r = serve_file(ctx, &store::blob_path(&ctx.hub.data, &e.sha256), e.size).await?;
    r.headers_mut()
        .insert("x-repo-commit", HeaderValue::from_str(&oid).unwrap());
    r.headers_mut().insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{}\"", e.git_oid)).unwrap(),
    );
    Ok(r)
}

async fn storage_get(ctx: &Ctx, t: &Target) -> HResult {
    if t.id.len() != 64 || !t.id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(hub_err(404, None, "no such object"));
    }
    let path = store::blob_path(&ctx.hub.data, &t.id);
    let size = tokio::fs::metadata(&path)
        .await
        .map_err(|_| hub_err(404, None, "no such object"))?
        .len();
    let mut r = serve_file(ctx, &path, size).await?;
    r.headers_mut().insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{}\"", t.id)).unwrap(),
    );
    Ok(r)
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` -> (start, len); `Err` = unsatisfiable.
fn parse_range(h: &str, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = h.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.saturating_sub(n), size.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, size.saturating_sub(1)),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(size.saturating_sub(1)),
        ),
    };
    if start >= size || end < start {
        return Some(Err(()));
    }
    Some(Ok((start, end - start + 1)))
}

/// Streams a file (or a `Range` of it), cutting the connection after `ctx.cut` bytes if asked.
async fn serve_file(ctx: &Ctx, path: &Path, size: u64) -> HResult {
    let range = ctx
        .headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| parse_range(h, size));
    let (status, start, len) = match range {
        None => (200, 0, size),
        Some(Ok((s, l))) => (206, s, l),
        Some(Err(())) => {
            let mut r = hub_err(416, None, "Range Not Satisfiable");
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).unwrap(),
            );
            return Err(r);
        }
    };
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, len.to_string());
    if status == 206 {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", start + len - 1),
        );
    }
    if ctx.method == Method::HEAD {
        return Ok(b.body(Body::empty()).unwrap());
    }
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| hub_err(500, None, &e.to_string()))?;
    f.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| hub_err(500, None, &e.to_string()))?;
    let stream = tokio_util::io::ReaderStream::with_capacity(f.take(len), 256 << 10);
    let body = match ctx.cut {
        None => Body::from_stream(stream),
        Some(n) => {
            let mut sent = 0u64;
            Body::from_stream(stream.map(move |r| {
                let b = r?;
                if sent + b.len() as u64 > n {
                    return Err(std::io::Error::other("injected cut"));
                }
                sent += b.len() as u64;
                Ok(b)
            }))
        }
    };
    Ok(b.body(body).unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Some(Ok((0, 10))));
        assert_eq!(parse_range("bytes=4-", 10), Some(Ok((4, 6))));
        assert_eq!(parse_range("bytes=2-3", 10), Some(Ok((2, 2))));
        assert_eq!(parse_range("bytes=2-99", 10), Some(Ok((2, 8))));
        assert_eq!(parse_range("bytes=-3", 10), Some(Ok((7, 3))));
        assert_eq!(parse_range("bytes=10-", 10), Some(Err(())));
        assert_eq!(parse_range("bytes=5-2", 10), Some(Err(())));
        assert_eq!(
            parse_range("bytes=0-1,3-4", 10),
            None,
            "multi-range: whole file"
        );
        assert_eq!(parse_range("items=0-1", 10), None);
    }

    #[test]
    fn paths_classify_like_the_hub() {
        let get = Method::GET;
        let (r, t) = parse(&get, "/datasets/a/b/resolve/main/dir/x%20y.bin", false);
        assert_eq!(
            (r, t.kind, t.repo.as_str(), t.rev.as_str(), t.file.as_str()),
            (
                HubRoute::ResolveGet,
                Some(RepoKind::Dataset),
                "a/b",
                "main",
                "dir/x y.bin"
            )
        );
        let (r, t) = parse(&Method::POST, "/a/b.git/info/lfs/objects/batch", false);
        assert_eq!(
            (r, t.kind, t.repo.as_str()),
            (HubRoute::LfsBatch, Some(RepoKind::Model), "a/b")
        );
        let (r, t) = parse(&get, "/api/models/a/b/revision/refs%2Fpr%2F1", false);
        assert_eq!((r, t.rev.as_str()), (HubRoute::RepoInfo, "refs/pr/1"));
        assert_eq!(
            parse(&get, "/api/datasets/a/b/tree/main/sub", false).1.file,
            "sub"
        );
        assert_eq!(parse(&Method::PUT, "/upload/u1/part/3", true).1.part, 3);
        assert_eq!(classify(&get, "/upload/u1", true), HubRoute::Unknown);
        assert_eq!(classify(&get, "/%zz/%", false), HubRoute::Unknown);
    }
}
