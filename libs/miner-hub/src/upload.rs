//! One-file uploads as `upload_folder` does them without Xet: preupload, LFS batch offering
//! `basic` and `multipart`, the transfer streamed from disk slice by slice (each multipart part is
//! retried on its own), verify, then the NDJSON commit. The sha256 oid is computed streaming first.

use crate::client::{encode, read_json, str_field};
use crate::{CommitInfo, HubClient, HubError, MAX_REGULAR_BYTES, RepoId, RepoType, escape};
use base64::Engine;
use reqwest::header;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;

const LFS_MEDIA: &str = "application/vnd.git-lfs+json";
/// Most parts a multipart upload may ask for (the Hub's S3 limit is 10 000).
const MAX_PARTS: u64 = 10_000;

/// Size, first 512 bytes and sha256 of a local file, read streaming.
struct LocalFile {
    size: u64,
    sample: Vec<u8>,
    sha256: String,
}

fn hash_file(path: &Path) -> Result<LocalFile, HubError> {
    let mut f = std::fs::File::open(path).map_err(|e| HubError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut sample = Vec::new();
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| HubError::io(path, e))?;
        if n == 0 {
            break;
        }
        if sample.len() < 512 {
            let take = (512 - sample.len()).min(n);
            sample.extend_from_slice(&buf[..take]);
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(LocalFile {
        size,
        sample,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// A path inside a repo: relative, `/`-separated, no `.`/`..`/empty segments, no control characters.
fn check_repo_path(p: &str) -> Result<(), HubError> {
    let ok = !p.is_empty()
        && p.len() <= 1024
        && !p.chars().any(char::is_control)
        && p.split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if ok {
        Ok(())
    } else {
        Err(HubError::Config(format!(
            "invalid path in repo {:?}",
            escape(p)
        )))
    }
}

/// The request body for one slice of a local file, streamed: a blocking reader thread fills
/// `buf`-sized chunks into a channel of 4 (so at most ~5 buffers are in memory); progress counts
/// bytes handed to the connection.
fn file_slice_body(
    path: &Path,
    offset: u64,
    len: u64,
    buf: usize,
    progress: Option<Arc<watch::Sender<u64>>>,
) -> Result<reqwest::Body, HubError> {
    let mut f = std::fs::File::open(path).map_err(|e| HubError::io(path, e))?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| HubError::io(path, e))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    let buf = buf.max(4096);
    tokio::task::spawn_blocking(move || {
        let mut left = len;
        while left > 0 {
            let mut chunk = vec![0u8; buf.min(left as usize)];
            let r = f.read_exact(&mut chunk).map(|()| bytes::Bytes::from(chunk));
            let failed = r.is_err();
            left -= if failed {
                left
            } else {
                buf.min(left as usize) as u64
            };
            if tx.blocking_send(r).is_err() || failed {
                return; // the request was dropped, or the file ended early
            }
        }
    });
    let stream = futures::stream::unfold(rx, move |mut rx| {
        let progress = progress.clone();
        async move {
            let item = rx.recv().await?;
            if let (Ok(b), Some(p)) = (&item, &progress) {
                p.send_modify(|v| *v += b.len() as u64);
            }
            Some((item, rx))
        }
    });
    Ok(reqwest::Body::wrap_stream(stream))
}

/// What to commit for the file.
enum CommitOp {
    Lfs { sha256: String, size: u64 },
    Inline { content_b64: String },
}

impl HubClient {
    /// Uploads one local file to `path_in_repo` on `main` and returns the commit.
    pub async fn upload_file(
        &self,
        repo: &RepoId,
        kind: RepoType,
        local: &Path,
        path_in_repo: &str,
        summary: &str,
        progress: Option<watch::Sender<u64>>,
    ) -> Result<CommitInfo, HubError> {
        check_repo_path(path_in_repo)?;
        let owned = local.to_path_buf();
        let file = tokio::task::spawn_blocking(move || hash_file(&owned))
            .await
            .map_err(|e| HubError::Config(format!("hashing task: {e}")))??;
        tracing::debug!(size = file.size, "Hub upload: hashed");
        let mode = self.preupload(repo, kind, path_in_repo, &file).await?;
        tracing::debug!(%mode, "Hub upload: preupload done");
        let progress = progress.map(Arc::new);
        let op = if mode == "regular" && file.size <= MAX_REGULAR_BYTES {
            let bytes = tokio::fs::read(local)
                .await
                .map_err(|e| HubError::io(local, e))?;
            if bytes.len() as u64 != file.size {
                return Err(HubError::io(
                    local,
                    std::io::Error::other("file changed while uploading"),
                ));
            }
            if let Some(p) = &progress {
                p.send_replace(file.size);
            }
            CommitOp::Inline {
                content_b64: base64::engine::general_purpose::STANDARD.encode(&bytes),
            }
        } else {
            self.lfs_upload(repo, kind, local, &file, progress).await?;
            tracing::debug!("Hub upload: LFS transfer done");
            CommitOp::Lfs {
                sha256: file.sha256.clone(),
                size: file.size,
            }
        };
        self.commit(repo, kind, path_in_repo, summary, op).await
    }

    /// `POST /api/<kind>s/<repo>/preupload/main` -> `"lfs"` or `"regular"`.
    async fn preupload(
        &self,
        repo: &RepoId,
        kind: RepoType,
        path: &str,
        file: &LocalFile,
    ) -> Result<String, HubError> {
        let url = self.api_url(kind, repo, "/preupload/main");
        let body = json!({"files": [{
            "path": path,
            "sample": base64::engine::general_purpose::STANDARD.encode(&file.sample),
            "size": file.size,
        }]});
        let v = self.json(reqwest::Method::POST, &url, Some(&body)).await?;
        let entry = v
            .get("files")
            .and_then(|f| f.as_array())
            .and_then(|a| {
                a.iter()
                    .find(|e| e.get("path").and_then(|p| p.as_str()) == Some(path))
            })
            .ok_or_else(|| {
                HubError::Protocol(format!(
                    "{}: preupload reply lacks {:?}",
                    escape(&url),
                    escape(path)
                ))
            })?;
        Ok(str_field(entry, "uploadMode", &url)?.to_string())
    }

    /// LFS batch, then the transfer the Hub chose, then verify.
    async fn lfs_upload(
        &self,
        repo: &RepoId,
        kind: RepoType,
        local: &Path,
        file: &LocalFile,
        progress: Option<Arc<watch::Sender<u64>>>,
    ) -> Result<(), HubError> {
        let url = format!(
            "{}/{}{}.git/info/lfs/objects/batch",
            self.cfg.endpoint,
            kind.url_prefix(),
            repo
        );
        let body = json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": [{"oid": file.sha256, "size": file.size}],
            "hash_algo": "sha256",
            "ref": {"name": "main"},
        });
        let resp = self
            .send(&url, || {
                Ok(self
                    .plain
                    .post(&url)
                    .header(header::ACCEPT, LFS_MEDIA)
                    .header(header::CONTENT_TYPE, LFS_MEDIA)
                    .body(body.to_string()))
            })
            .await?;
        let v = read_json(&url, resp).await?;
        let obj = v
            .get("objects")
            .and_then(|o| o.as_array())
            .and_then(|a| {
                a.iter()
                    .find(|o| o.get("oid").and_then(|x| x.as_str()) == Some(file.sha256.as_str()))
            })
            .ok_or_else(|| {
                HubError::Protocol(format!("{}: batch reply lacks our object", escape(&url)))
            })?;
        if let Some(err) = obj.get("error") {
            return Err(HubError::Protocol(format!(
                "LFS batch refused the object: {}",
                escape(&err.to_string())
            )));
        }
        let Some(upload) = obj.pointer("/actions/upload") else {
            if let Some(p) = &progress {
                p.send_replace(file.size);
            }
            return Ok(()); // already stored
        };
        let href = action_href(upload)?;
        let hdr = upload.get("header").cloned().unwrap_or(Value::Null);
        match hdr.get("chunk_size") {
            Some(cs) => {
                let chunk = cs
                    .as_u64()
                    .or_else(|| cs.as_str().and_then(|s| s.parse().ok()))
                    .filter(|&c| c > 0);
                let chunk = chunk.ok_or_else(|| {
                    HubError::Protocol(format!(
                        "bad multipart chunk_size {}",
                        escape(&cs.to_string())
                    ))
                })?;
                self.multipart(local, file, &href, &hdr, chunk, progress)
                    .await?;
            }
            None => {
                let len = file.size;
                let buf = self.cfg.io_buffer;
                self.send(&href, || {
                    let body = file_slice_body(local, 0, len, buf, progress.clone())?;
                    Ok(self
                        .http
                        .put(&href)
                        .header(header::CONTENT_LENGTH, len)
                        .body(body))
                })
                .await?;
            }
        }
        if let Some(verify) = obj.pointer("/actions/verify") {
            let vurl = action_href(verify)?;
            let body = json!({"oid": file.sha256, "size": file.size});
            self.send(&vurl, || {
                Ok(self
                    .plain
                    .post(&vurl)
                    .header(header::ACCEPT, LFS_MEDIA)
                    .header(header::CONTENT_TYPE, LFS_MEDIA)
                    .body(body.to_string()))
            })
            .await?;
        }
        Ok(())
    }

    /// `multipart`: a PUT per `chunk` slice to the URLs under `"1".."n"`, then the completion POST.
    async fn multipart(
        &self,
        local: &Path,
        file: &LocalFile,
        href: &str,
        hdr: &Value,
        chunk: u64,
        progress: Option<Arc<watch::Sender<u64>>>,
    ) -> Result<(), HubError> {
        let n = file.size.div_ceil(chunk);
        if n > MAX_PARTS {
            return Err(HubError::Protocol(format!(
                "multipart asks for {n} parts (> {MAX_PARTS})"
            )));
        }
        let mut urls = Vec::with_capacity(n as usize);
        for i in 1..=n {
            let url = hdr
                .get(i.to_string())
                .and_then(|u| u.as_str())
                .ok_or_else(|| {
                    HubError::Protocol(format!("multipart header lacks the URL of part {i} of {n}"))
                })?;
            urls.push((i, url.to_string()));
        }
        // Up to `parallel_parts` part PUTs at once, each retried on its own; ETags kept in order.
        let puts = urls.into_iter().map(|(i, part_url)| {
            let progress = progress.clone();
            async move {
                let offset = (i - 1) * chunk;
                let len = chunk.min(file.size - offset);
                let buf = self.cfg.io_buffer;
                let resp = self
                    .send(&part_url, || {
                        let body = file_slice_body(local, offset, len, buf, progress.clone())?;
                        Ok(self
                            .http
                            .put(&part_url)
                            .header(header::CONTENT_LENGTH, len)
                            .body(body))
                    })
                    .await?;
                let etag = crate::client::header_str(&resp, "etag")
                    .ok_or_else(|| HubError::Protocol(format!("part {i} PUT reply has no ETag")))?;
                Ok::<_, HubError>(json!({"partNumber": i, "etag": etag}))
            }
        });
        use futures::StreamExt;
        let parts: Vec<Value> = futures::stream::iter(puts)
            .buffered(self.cfg.parallel_parts.max(1))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        tracing::debug!(parts = parts.len(), "Hub upload: parts sent");
        let body = json!({"oid": file.sha256, "parts": parts});
        self.send(href, || {
            Ok(self
                .plain
                .post(href)
                .header(header::ACCEPT, LFS_MEDIA)
                .header(header::CONTENT_TYPE, LFS_MEDIA)
                .body(body.to_string()))
        })
        .await?;
        Ok(())
    }

    /// `POST /api/<kind>s/<repo>/commit/main` (NDJSON: header + one file op).
    async fn commit(
        &self,
        repo: &RepoId,
        kind: RepoType,
        path: &str,
        summary: &str,
        op: CommitOp,
    ) -> Result<CommitInfo, HubError> {
        let url = self.api_url(kind, repo, &format!("/commit/{}", encode("main", false)));
        let header_line =
            json!({"key": "header", "value": {"summary": summary, "description": ""}});
        let op_line = match &op {
            CommitOp::Lfs { sha256, size } => {
                json!({"key": "lfsFile", "value": {"path": path, "algo": "sha256", "oid": sha256, "size": size}})
            }
            CommitOp::Inline { content_b64 } => {
                json!({"key": "file", "value": {"content": content_b64, "path": path, "encoding": "base64"}})
            }
        };
        let body = format!("{header_line}\n{op_line}\n");
        let resp = self
            .send(&url, || {
                Ok(self
                    .plain
                    .post(&url)
                    .header(header::CONTENT_TYPE, "application/x-ndjson")
                    .body(body.clone()))
            })
            .await?;
        let v = read_json(&url, resp).await?;
        let oid = str_field(&v, "commitOid", &url)?.to_string();
        if !crate::is_commit_oid(&oid) {
            return Err(HubError::Protocol(format!(
                "commit oid {:?} is not 40 hex",
                escape(&oid)
            )));
        }
        Ok(CommitInfo {
            oid,
            url: v
                .get("commitUrl")
                .and_then(|u| u.as_str())
                .map(str::to_string),
        })
    }
}

fn action_href(action: &Value) -> Result<String, HubError> {
    let href = action
        .get("href")
        .and_then(|h| h.as_str())
        .ok_or_else(|| HubError::Protocol("LFS action without href".into()))?;
    match url::Url::parse(href) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(href.to_string()),
        _ => Err(HubError::Protocol(format!(
            "LFS action href {:?} is not an http(s) URL",
            escape(href)
        ))),
    }
}
