//! Streaming a Hub dataset (`dataset_sources[].path = owner/name[@revision]`, `name` = its config)
//! shard by shard while training.
//!
//! The revision is pinned to a commit on first open (and saved with the data position, so a
//! resume reads the same files). The config's training data files come from the dataset card's
//! `configs:` (`data_files` globs, split `train`) or, without one, from the files under
//! `<config>/` (training files only when names say `train`). Each shard is downloaded into
//! `<cache>/datasets/<owner>--<name>/<commit>/` (a `.part` continued across retries and restarts;
//! the size checked against the listing), read as JSON lines (gzip or not) or parquet, and removed
//! once read. A shard that cannot be parsed is skipped with a warning and counted in
//! [`SKIPPED_SHARDS`]. Position = (shard index, documents read in it).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use super::DataError;
use super::source::{DocReader, SourceSpec};
use crate::model::hub::{self, HubEndpoint, RemoteFile, RemoteRepo, RepoKind};

/// Shards skipped because they could not be parsed (process-wide; exported as a metric).
pub static SKIPPED_SHARDS: AtomicU64 = AtomicU64::new(0);

/// Largest dataset card read.
const MAX_README: u64 = 4 << 20;
/// Largest shard downloaded.
pub const MAX_SHARD_BYTES: u64 = 8 << 30;

/// A Hub dataset source.
#[derive(Debug, Clone, PartialEq)]
pub struct HubDataset {
    pub endpoint: HubEndpoint,
    pub cache: PathBuf,
    pub repo: String,
    pub revision: String,
    /// The dataset config (`name`), e.g. `en` for C4, `4plus` for Nemotron-CC-Math.
    pub config: Option<String>,
    pub text_column: String,
}

fn err(ds: &str, reason: impl std::fmt::Display) -> DataError {
    DataError::Open {
        path: ds.to_string(),
        reason: reason.to_string(),
    }
}

/// Matches one path segment against a pattern segment with `*` and `?`.
fn seg_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// Glob over `/`-separated paths: `*`/`?` within a segment, `**` for any number of segments.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.trim_start_matches("./").split('/').collect();
    let s: Vec<&str> = path.split('/').collect();
    if p.len() > 64 || s.len() > 64 {
        return false;
    }
    // Iterative over (pattern index, path index) states; at most 65*65 of them.
    let mut reach = vec![vec![false; s.len() + 1]; p.len() + 1];
    reach[0][0] = true;
    for i in 0..p.len() {
        for j in 0..=s.len() {
            if !reach[i][j] {
                continue;
            }
            if p[i] == "**" {
                for r in reach[i + 1].iter_mut().skip(j) {
                    *r = true;
                }
            } else if j < s.len() && seg_match(p[i].as_bytes(), s[j].as_bytes()) {
                reach[i + 1][j + 1] = true;
            }
        }
    }
    reach[p.len()][s.len()]
}

fn is_data_file(path: &str) -> bool {
    [".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz"]
        .iter()
        .any(|e| path.ends_with(e))
}

/// The `train` data-file patterns of `config` in a dataset card's YAML header, if it lists any.
fn card_patterns(readme: &str, config: Option<&str>) -> Option<Vec<String>> {
    let body = readme.strip_prefix("---")?;
    let end = body.find("\n---")?;
    let y: serde_yaml::Value = serde_yaml::from_str(&body[..end]).ok()?;
    let configs = y.get("configs")?.as_sequence()?;
    let want = config.unwrap_or("default");
    let c = configs
        .iter()
        .find(|c| c.get("config_name").and_then(|n| n.as_str()) == Some(want))?;
    let strs = |v: &serde_yaml::Value| -> Vec<String> {
        match v {
            serde_yaml::Value::String(s) => vec![s.clone()],
            serde_yaml::Value::Sequence(l) => l
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    };
    let df = c.get("data_files")?;
    let out: Vec<String> = match df {
        serde_yaml::Value::Sequence(items) if items.iter().any(|i| i.is_mapping()) => items
            .iter()
            .filter(|i| i.get("split").and_then(|s| s.as_str()).unwrap_or("train") == "train")
            .flat_map(|i| i.get("path").map(strs).unwrap_or_default())
            .collect(),
        serde_yaml::Value::Mapping(m) => m.get("train").map(strs).unwrap_or_default(),
        other => strs(other),
    };
    (!out.is_empty()).then_some(out)
}

/// The directory every match of `pattern` lies in (its literal prefix up to the last `/` before
/// the first wildcard), `None` at the root.
fn literal_dir(pattern: &str) -> Option<String> {
    let p = pattern.trim_start_matches("./");
    let lit = &p[..p.find(['*', '?', '[', '{']).unwrap_or(p.len())];
    let dir = &lit[..lit.rfind('/')?];
    (!dir.is_empty()).then(|| dir.to_string())
}

/// The training data files of `config`, sorted by path. Only the directory the config's files
/// live in is listed (C4 alone has tens of thousands of files in other configs).
pub fn data_files(
    repo: &dyn RemoteRepo,
    config: Option<&str>,
) -> Result<Vec<RemoteFile>, DataError> {
    let label = repo.label();
    let patterns = match repo.file_size("README.md").map_err(|e| err(&label, e))? {
        Some(size) if size <= MAX_README => {
            let bytes = hub::read_vec(repo, "README.md", 0, size, MAX_README)
                .map_err(|e| err(&label, e))?;
            card_patterns(&String::from_utf8_lossy(&bytes), config)
        }
        _ => None,
    };
    // One listing: the common directory of the patterns, else the config's directory.
    let dirs: Option<Vec<String>> = match &patterns {
        Some(p) => p.iter().map(|g| literal_dir(g)).collect(),
        None => config.map(|c| vec![c.to_string()]),
    };
    let files = match dirs {
        Some(d) if !d.is_empty() && d.iter().all(|x| *x == d[0]) => repo.list_files_under(&d[0]),
        _ => repo.list_files(),
    }
    .map_err(|e| err(&label, e))?;
    let mut out: Vec<RemoteFile> = match patterns {
        Some(p) => files
            .into_iter()
            .filter(|f| p.iter().any(|g| glob_match(g, &f.path)))
            .collect(),
        None => {
            let prefix = config.map(|c| format!("{c}/")).unwrap_or_default();
            let data: Vec<RemoteFile> = files
                .into_iter()
                .filter(|f| f.path.starts_with(&prefix) && is_data_file(&f.path))
                .collect();
            let train: Vec<RemoteFile> = data
                .iter()
                .filter(|f| {
                    f.path
                        .rsplit('/')
                        .next()
                        .is_some_and(|n| n.contains("train"))
                })
                .cloned()
                .collect();
            if train.is_empty() { data } else { train }
        }
    };
    out.retain(|f| is_data_file(&f.path));
    out.sort_by(|a, b| a.path.cmp(&b.path));
    if out.is_empty() {
        return Err(err(
            &label,
            format!("no training data files for config {config:?}"),
        ));
    }
    Ok(out)
}

/// A safe cache file name for shard `i` at repository path `path`: the index, then the file
/// name's portable characters (a listing may hold `..` or odd bytes; they never reach the path).
fn local_name(i: u64, path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or_default();
    let clean: String = base
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(120)
        .collect();
    format!("{i:06}-{clean}")
}

/// Reads a Hub dataset's shards in order.
pub(crate) struct HubShards {
    ds: HubDataset,
    repo: Box<dyn RemoteRepo>,
    pub(crate) commit: String,
    files: Vec<RemoteFile>,
    dir: PathBuf,
    /// Index of the shard being read.
    pub(crate) shard: u64,
    /// Documents read from it.
    pub(crate) shard_doc: u64,
    /// Documents to skip when the shard is opened (resume).
    skip: u64,
    cur: Option<(PathBuf, DocReader)>,
}

impl HubShards {
    /// Lists the dataset at `commit` (or its revision, resolved now).
    pub(crate) fn open(ds: &HubDataset, commit: Option<&str>) -> Result<Self, DataError> {
        let rev = commit.unwrap_or(&ds.revision);
        let label = format!("{}@{rev}", ds.repo);
        let repo = hub::open_repo(&ds.endpoint, RepoKind::Dataset, &ds.repo, rev)
            .map_err(|e| err(&label, e))?;
        let commit = repo.commit().map_err(|e| err(&label, e))?;
        let files = data_files(repo.as_ref(), ds.config.as_deref())?;
        let dir = ds
            .cache
            .join("datasets")
            .join(ds.repo.replace('/', "--"))
            .join(&commit);
        Ok(HubShards {
            ds: ds.clone(),
            repo,
            commit,
            files,
            dir,
            shard: 0,
            shard_doc: 0,
            skip: 0,
            cur: None,
        })
    }

    /// Continue at document `doc` of shard `shard`.
    pub(crate) fn seek(&mut self, shard: u64, doc: u64) {
        self.cur = None;
        self.shard = shard;
        self.shard_doc = 0;
        self.skip = doc;
    }

    fn name(&self) -> String {
        format!("{}@{}", self.ds.repo, self.commit)
    }

    /// Downloads shard `i` (continuing a `.part`) and opens it.
    fn open_shard(
        &self,
        f: &RemoteFile,
    ) -> Result<(PathBuf, Result<DocReader, DataError>), DataError> {
        if f.size > MAX_SHARD_BYTES {
            return Err(err(
                &self.name(),
                format!("shard {:?} is {} bytes", f.path, f.size),
            ));
        }
        let local = self.dir.join(local_name(self.shard, &f.path));
        if std::fs::metadata(&local).map(|m| m.len()).ok() != Some(f.size) {
            std::fs::create_dir_all(&self.dir).map_err(|e| err(&self.name(), e))?;
            let part = local.with_extension("part");
            hub::download_range_to(self.repo.as_ref(), &f.path, 0, f.size, &part)
                .map_err(|e| err(&self.name(), e))?;
            std::fs::rename(&part, &local).map_err(|e| err(&self.name(), e))?;
        }
        let spec = SourceSpec::local(
            &format!("{}/{}", self.name(), f.path),
            &local,
            &self.ds.text_column,
            1.0,
        );
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| spec.open()))
            .unwrap_or_else(|_| Err(DataError::Config("the shard's decoder panicked".into())));
        Ok((local, opened))
    }

    fn skip_shard(&mut self, why: &DataError) {
        SKIPPED_SHARDS.fetch_add(1, Ordering::Relaxed);
        let path = self.files.get(self.shard as usize).map(|f| f.path.clone());
        tracing::warn!(dataset = %self.name(), shard = ?path, error = %why, "unreadable dataset shard skipped");
        self.finish_shard();
    }

    fn finish_shard(&mut self) {
        if let Some((p, _)) = self.cur.take() {
            let _ = std::fs::remove_file(p);
        }
        self.shard += 1;
        self.shard_doc = 0;
        self.skip = 0;
    }

    /// The next document, `None` after the last shard.
    pub(crate) fn next_doc(&mut self) -> Result<Option<String>, DataError> {
        loop {
            if self.cur.is_none() {
                let Some(f) = self.files.get(self.shard as usize).cloned() else {
                    return Ok(None);
                };
                let (local, reader) = self.open_shard(&f)?;
                match reader {
                    Ok(r) => self.cur = Some((local, r)),
                    Err(e) => {
                        self.cur = Some((local, DocReader::empty()));
                        self.skip_shard(&e);
                        continue;
                    }
                }
                for _ in 0..self.skip {
                    if let Some((_, r)) = &mut self.cur
                        && r.next_doc().ok().flatten().is_none()
                    {
                        break;
                    }
                    self.shard_doc += 1;
                }
                self.skip = 0;
            }
            let Some((_, r)) = &mut self.cur else {
                continue;
            };
            // A decoder that panics on a hostile shard must not take the trainer down.
            let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.next_doc()))
                .unwrap_or_else(|_| Err(DataError::Config("the shard's decoder panicked".into())));
            match next {
                Ok(Some(doc)) => {
                    self.shard_doc += 1;
                    return Ok(Some(doc));
                }
                Ok(None) => self.finish_shard(),
                Err(e) => self.skip_shard(&e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_cards() {
        assert!(glob_match(
            "en/c4-train.*.json.gz",
            "en/c4-train.00001-of-01024.json.gz"
        ));
        assert!(!glob_match(
            "en/c4-train.*.json.gz",
            "en/c4-validation.00001-of-00008.json.gz"
        ));
        assert!(!glob_match("en/*", "en/x/y.json"));
        assert!(glob_match("4plus/**", "4plus/a/b.parquet"));
        assert!(glob_match("**/*.parquet", "4plus/b.parquet"));
        let card = "---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n    path: en/c4-train.*.json.gz\n  - split: validation\n    path: en/c4-validation.*.json.gz\n- config_name: 4plus\n  data_files: 4plus/*.parquet\n---\n# C4\n";
        assert_eq!(
            card_patterns(card, Some("en")),
            Some(vec!["en/c4-train.*.json.gz".to_string()])
        );
        assert_eq!(
            card_patterns(card, Some("4plus")),
            Some(vec!["4plus/*.parquet".to_string()])
        );
        assert_eq!(card_patterns(card, Some("fr")), None);
        assert_eq!(card_patterns("# no header", Some("en")), None);
        assert_eq!(local_name(3, "en/../../x.json.gz"), "000003-x.json.gz");
        assert_eq!(literal_dir("en/c4-train.*.json.gz").as_deref(), Some("en"));
        assert_eq!(literal_dir("4plus/**").as_deref(), Some("4plus"));
        assert_eq!(literal_dir("*.parquet"), None);
        assert_eq!(literal_dir("a/b/*/x").as_deref(), Some("a/b"));
        assert_eq!(local_name(0, ".."), "000000-..");
        assert!(!local_name(0, "a/b\n\u{1b}[31m.parquet").contains('\n'));
    }
}
