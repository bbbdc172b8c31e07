//! The LFS side: the batch endpoint (`basic` or `multipart` with `chunk_size` and part URLs on the
//! storage listener), streamed PUTs checked against the announced size and sha256, the multipart
//! completion (ETags checked, the assembled object hashed) and verify. Parts are written straight
//! into the object at their offsets, so completing costs one read, not a copy.
// Handlers return `Result<Response, Response>`: the error side is the HTTP answer itself.
#![allow(clippy::result_large_err)]

use super::handlers::{Ctx, HResult, Target, hub_err, json_resp, read_json};
use super::store::{self, RepoKind, Upload};
use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

const LFS_MEDIA: &str = "application/vnd.git-lfs+json";

fn lfs_json(v: Value) -> Response {
    let mut r = json_resp(200, v);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(LFS_MEDIA));
    r
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `POST /<repo>.git/info/lfs/objects/batch`.
pub(crate) async fn batch(ctx: &Ctx, kind: RepoKind, t: &Target, body: Body) -> HResult {
    ctx.write_repo(kind, &t.repo)?;
    let v = read_json(body, 1 << 20).await?;
    if v.get("operation").and_then(Value::as_str) != Some("upload") {
        return Err(hub_err(400, None, "only the upload operation is served"));
    }
    let transfers: Vec<&str> = v
        .get("transfers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    ctx.hub
        .batch_transfers
        .lock()
        .unwrap()
        .push(transfers.iter().map(|t| t.to_string()).collect());
    let objects = v
        .get("objects")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let chunk = ctx.hub.opts.multipart_chunk_size.max(1);
    let mut out = Vec::new();
    let mut transfer = "basic";
    for o in objects.iter().take(1000) {
        let oid = o
            .get("oid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let size = o.get("size").and_then(Value::as_u64);
        let Some(size) = size.filter(|_| is_sha256(&oid)) else {
            out.push(
                json!({"oid": oid, "size": 0, "error": {"code": 422, "message": "invalid object"}}),
            );
            continue;
        };
        let on_disk = tokio::fs::metadata(store::blob_path(&ctx.hub.data, &oid))
            .await
            .map(|m| m.len())
            .ok();
        if on_disk == Some(size) {
            out.push(json!({"oid": oid, "size": size}));
            continue;
        }
        let multipart = transfers.contains(&"multipart") && size > chunk;
        let id = {
            let mut st = ctx.hub.store.lock().unwrap();
            st.next_upload += 1;
            let id = format!("u{}-{}", st.next_upload, &oid[..12]);
            let parts = if multipart {
                size.div_ceil(chunk) as usize
            } else {
                0
            };
            st.uploads.insert(
                id.clone(),
                Upload {
                    sha256: oid.clone(),
                    size,
                    chunk: multipart.then_some(chunk),
                    part_etags: vec![None; parts],
                },
            );
            id
        };
        let verify = json!({"href": format!("{}/{}{}.git/info/lfs/objects/verify", ctx.hub.endpoint, kind.url_prefix(), t.repo), "header": {}});
        let upload = if multipart {
            transfer = "multipart";
            let mut h = serde_json::Map::new();
            h.insert("chunk_size".into(), json!(chunk.to_string()));
            for n in 1..=size.div_ceil(chunk) {
                h.insert(
                    n.to_string(),
                    json!(format!("{}/upload/{id}/part/{n}", ctx.hub.storage)),
                );
            }
            json!({"href": format!("{}/lfs-complete/{id}", ctx.hub.endpoint), "header": h})
        } else {
            json!({"href": format!("{}/upload/{id}", ctx.hub.storage), "header": {}})
        };
        out.push(json!({"oid": oid, "size": size, "authenticated": true, "actions": {"upload": upload, "verify": verify}}));
    }
    Ok(lfs_json(
        json!({"transfer": transfer, "objects": out, "hash_algo": "sha256"}),
    ))
}

/// Streams a request body into `dest` at `offset` (multipart parts go straight into the assembled
/// object; `truncate` for a whole object), refusing more than `max` bytes; returns (size, sha256
/// of the body).
async fn receive(
    body: Body,
    dest: &Path,
    offset: u64,
    max: u64,
    truncate: bool,
) -> Result<(u64, String), Response> {
    use tokio::io::AsyncSeekExt;
    let err500 = |e: std::io::Error| hub_err(500, None, &format!("storage: {e}"));
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(truncate)
        .open(dest)
        .await
        .map_err(err500)?;
    f.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(err500)?;
    let mut w = tokio::io::BufWriter::with_capacity(1 << 20, f);
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| hub_err(400, None, &format!("body: {e}")))?;
        n += chunk.len() as u64;
        if n > max {
            return Err(hub_err(400, None, "body larger than announced"));
        }
        h.update(&chunk);
        w.write_all(&chunk).await.map_err(err500)?;
    }
    w.flush().await.map_err(err500)?;
    Ok((n, hex::encode(h.finalize())))
}

fn upload(ctx: &Ctx, id: &str) -> Result<Upload, Response> {
    ctx.hub
        .store
        .lock()
        .unwrap()
        .uploads
        .get(id)
        .cloned()
        .ok_or_else(|| hub_err(404, None, "no such upload"))
}

fn tmp(ctx: &Ctx, name: &str) -> PathBuf {
    ctx.hub.data.join("tmp").join(name)
}

/// Storage `PUT /upload/<id>` (`basic`): the whole object.
pub(crate) async fn put_basic(ctx: &Ctx, t: &Target, body: Body) -> HResult {
    let up = upload(ctx, &t.id)?;
    if up.chunk.is_some() {
        return Err(hub_err(400, None, "this upload is multipart"));
    }
    let dest = tmp(ctx, &format!("{}.basic", t.id));
    let (n, sha) = receive(body, &dest, 0, up.size, true).await?;
    if n != up.size || sha != up.sha256 {
        let _ = tokio::fs::remove_file(&dest).await;
        return Err(hub_err(
            400,
            None,
            &format!("object mismatch: got {n} bytes sha256 {sha}"),
        ));
    }
    tokio::fs::rename(&dest, store::blob_path(&ctx.hub.data, &up.sha256))
        .await
        .map_err(|e| hub_err(500, None, &e.to_string()))?;
    ctx.hub.store.lock().unwrap().uploads.remove(&t.id);
    Ok(Response::builder()
        .status(200)
        .header(header::ETAG, format!("\"{}\"", &sha[..32]))
        .body(Body::empty())
        .unwrap())
}

/// Storage `PUT /upload/<id>/part/<n>`: one slice of `chunk_size` (the last one shorter).
pub(crate) async fn put_part(ctx: &Ctx, t: &Target, body: Body) -> HResult {
    let up = upload(ctx, &t.id)?;
    let (Some(chunk), n) = (up.chunk, t.part) else {
        return Err(hub_err(400, None, "this upload is not multipart"));
    };
    if n == 0 || n as usize > up.part_etags.len() {
        return Err(hub_err(400, None, "part number out of range"));
    }
    let expect = chunk.min(up.size - (n - 1) * chunk);
    let dest = tmp(ctx, &format!("{}.full", t.id));
    let (got, sha) = receive(body, &dest, (n - 1) * chunk, expect, false).await?;
    if got != expect {
        return Err(hub_err(
            400,
            None,
            &format!("part {n}: {got} bytes, expected {expect}"),
        ));
    }
    let etag = format!("\"{}\"", &sha[..32]);
    if let Some(u) = ctx.hub.store.lock().unwrap().uploads.get_mut(&t.id) {
        u.part_etags[n as usize - 1] = Some(etag.clone());
    }
    Ok(Response::builder()
        .status(200)
        .header(header::ETAG, etag)
        .body(Body::empty())
        .unwrap())
}

/// `POST /lfs-complete/<id>` `{"oid","parts":[{"partNumber","etag"}]}`.
pub(crate) async fn complete(ctx: &Ctx, t: &Target, body: Body) -> HResult {
    let up = upload(ctx, &t.id)?;
    let v = read_json(body, 4 << 20).await?;
    if v.get("oid").and_then(Value::as_str) != Some(up.sha256.as_str()) {
        return Err(hub_err(400, None, "oid does not match the upload"));
    }
    let parts = v
        .get("parts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if parts.len() != up.part_etags.len() {
        return Err(hub_err(
            400,
            None,
            &format!(
                "{} parts listed, {} expected",
                parts.len(),
                up.part_etags.len()
            ),
        ));
    }
    for (i, p) in parts.iter().enumerate() {
        let num = p.get("partNumber").and_then(Value::as_u64);
        let etag = p
            .get("etag")
            .and_then(Value::as_str)
            .map(|e| e.trim_matches('"'));
        let want = up.part_etags[i].as_deref().map(|e| e.trim_matches('"'));
        if num != Some(i as u64 + 1) || want.is_none() || etag != want {
            return Err(hub_err(
                400,
                None,
                &format!("part {} missing or with a wrong etag", i + 1),
            ));
        }
    }
    let full = tmp(ctx, &format!("{}.full", t.id));
    let (n, sha) = hash_file(full.clone())
        .await
        .map_err(|e| hub_err(500, None, &e.to_string()))?;
    if n != up.size || sha != up.sha256 {
        return Err(hub_err(
            400,
            None,
            &format!("assembled object mismatch: {n} bytes sha256 {sha}"),
        ));
    }
    tokio::fs::rename(&full, store::blob_path(&ctx.hub.data, &up.sha256))
        .await
        .map_err(|e| hub_err(500, None, &e.to_string()))?;
    ctx.hub.store.lock().unwrap().uploads.remove(&t.id);
    Ok(json_resp(200, json!({})))
}

/// The size and sha256 of the assembled object (read streaming).
async fn hash_file(path: PathBuf) -> std::io::Result<(u64, String)> {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(&path)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = f.read(&mut buf)?;
            if k == 0 {
                return Ok((n, hex::encode(h.finalize())));
            }
            h.update(&buf[..k]);
            n += k as u64;
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// `POST /<repo>.git/info/lfs/objects/verify` `{"oid","size"}`.
pub(crate) async fn verify(ctx: &Ctx, kind: RepoKind, t: &Target, body: Body) -> HResult {
    ctx.read_repo(kind, &t.repo)?;
    let v = read_json(body, 1 << 20).await?;
    let oid = v.get("oid").and_then(Value::as_str).unwrap_or("");
    let size = v.get("size").and_then(Value::as_u64);
    if !is_sha256(oid) {
        return Err(hub_err(400, None, "invalid oid"));
    }
    let on_disk = tokio::fs::metadata(store::blob_path(&ctx.hub.data, oid))
        .await
        .map(|m| m.len())
        .ok();
    if on_disk.is_none() || on_disk != size {
        return Err(hub_err(404, None, "Object not found"));
    }
    Ok(lfs_json(json!({})))
}
