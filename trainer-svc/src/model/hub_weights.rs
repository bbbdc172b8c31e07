//! Pretrained base weights from a Hub model repository, fetching only the bytes the partial model
//! uses (addendum A2/A3): the backbone (every non-expert tensor, router included), and the group's
//! routed experts. Each shard's header is read with two `Range` requests (the index
//! `model.safetensors.index.json` names the shards when present), then each needed tensor's byte
//! range is downloaded into a cache that survives restarts:
//! `<cache>/models/<owner>--<name>/<commit>/tensors/<name>.bin` plus a sidecar `<name>.json`
//! recording dtype, shape, length and a BLAKE2b-256 of the bytes. Before use every cached tensor
//! is checked against the remote header (dtype, shape, `numel * element size`) and its sidecar
//! hash; a truncated or corrupt file is fetched again. An interrupted download continues from its
//! `.part` file. `refs/<revision>` remembers the commit so a fully cached model starts offline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use blake2::Digest;
use serde::{Deserialize, Serialize};

use super::hub::{self, HubError, RemoteFile, RemoteRepo};
use super::naming::{self, HfExpertTensor};
use super::safetensors_dir::{self, MAX_HEADER_BYTES, TensorInfo};
use super::{GroupExperts, PartialModel};

/// The sharded-checkpoint index of `save_pretrained`.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Largest index file accepted.
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// What a fetch needed and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchReport {
    /// Commit the revision resolved to.
    pub commit: String,
    /// Tensors the partial model uses.
    pub tensors: usize,
    /// Their bytes.
    pub needed_bytes: u64,
    /// Bytes of every `*.safetensors` file of the repository.
    pub repo_bytes: u64,
    /// Bytes downloaded by this call (tensor data; headers not counted).
    pub downloaded_bytes: u64,
}

/// Which tensors of a base checkpoint the partial model needs: `backbone` names (non-expert
/// tensors of the model) and the owned experts per layer.
pub struct Needs {
    pub backbone: BTreeSet<String>,
    pub experts: GroupExperts,
}

impl Needs {
    pub fn of(model: &PartialModel) -> Self {
        Needs {
            backbone: model.shared_tensors().into_iter().map(|(n, _)| n).collect(),
            experts: model.group_experts(),
        }
    }

    /// A digest of what is needed (keys the saved plan).
    fn key(&self) -> String {
        let mut h = blake2::Blake2b::<blake2::digest::consts::U32>::new();
        for n in &self.backbone {
            h.update(n.as_bytes());
            h.update([0]);
        }
        for (l, v) in &self.experts {
            h.update(format!("{l}:{v:?};").as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// Whether a checkpoint tensor name is used (per-expert HF names of owned experts; stacked
    /// expert tensors of layers with owned experts).
    pub fn wants(&self, name: &str) -> bool {
        if self.backbone.contains(name) {
            return true;
        }
        match naming::parse_hf_expert_name(name) {
            Some(HfExpertTensor::PerExpert { layer, expert, .. }) => self
                .experts
                .get(&layer)
                .is_some_and(|v| v.binary_search(&expert).is_ok()),
            Some(HfExpertTensor::Stacked { layer, .. }) => self.experts.contains_key(&layer),
            None => false,
        }
    }
}

/// One tensor to fetch: its shard and absolute byte range there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Sidecar {
    shard: String,
    dtype: String,
    shape: Vec<i64>,
    start: u64,
    len: u64,
    blake2b256: String,
}

fn hash_file(p: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(p)?;
    let mut h = blake2::Blake2b::<blake2::digest::consts::U32>::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// `<cache>/models/<owner>--<name>/`.
pub fn repo_cache_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join("models").join(repo.replace('/', "--"))
}

/// The commit of `revision`: asked from the Hub (and remembered under `refs/`), or, when the
/// Hub cannot be reached, the remembered one.
fn resolve_commit(repo: &dyn RemoteRepo, dir: &Path, revision: &str) -> anyhow::Result<String> {
    let refs = dir.join("refs").join(revision.replace('/', "%2F"));
    match repo.commit() {
        Ok(c) => {
            std::fs::create_dir_all(dir.join("refs"))
                .and_then(|_| std::fs::write(&refs, &c))
                .with_context(|| format!("write {}", refs.display()))?;
            Ok(c)
        }
        Err(e @ HubError::Unreachable { .. }) => match std::fs::read_to_string(&refs) {
            Ok(c) if c.len() == 40 && c.bytes().all(|b| b.is_ascii_hexdigit()) => {
                tracing::warn!(error = %e, commit = %c, "Hub unreachable; using the cached revision");
                Ok(c)
            }
            _ => Err(e.into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// The shards holding needed tensors: from the index when the repository has one, else every
/// root `*.safetensors` file.
fn needed_shards(
    repo: &dyn RemoteRepo,
    files: &[RemoteFile],
    needs: &Needs,
) -> anyhow::Result<Vec<RemoteFile>> {
    let by_path: BTreeMap<&str, &RemoteFile> = files.iter().map(|f| (f.path.as_str(), f)).collect();
    let shard_names: BTreeSet<String> = match by_path.get(INDEX_FILE) {
        Some(idx) => {
            let bytes = hub::read_vec(repo, INDEX_FILE, 0, idx.size, MAX_INDEX_BYTES)?;
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: parse {INDEX_FILE}", repo.label()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: {INDEX_FILE} has no weight_map", repo.label()))?;
            map.iter()
                .filter(|(k, _)| needs.wants(k))
                .filter_map(|(_, f)| f.as_str().map(str::to_string))
                .collect()
        }
        None => files
            .iter()
            .filter(|f| !f.path.contains('/') && f.path.ends_with(".safetensors"))
            .map(|f| f.path.clone())
            .collect(),
    };
    if shard_names.is_empty() {
        bail!(
            "{}: no safetensors shard holds a tensor of this model",
            repo.label()
        );
    }
    shard_names
        .iter()
        .map(|s| {
            by_path
                .get(s.as_str())
                .map(|f| (*f).clone())
                .with_context(|| {
                    format!(
                        "{}: shard {s:?} named by the index is missing",
                        repo.label()
                    )
                })
        })
        .collect()
}

/// Reads one shard's header with two range requests.
fn remote_header(
    repo: &dyn RemoteRepo,
    shard: &RemoteFile,
) -> anyhow::Result<BTreeMap<String, TensorInfo>> {
    if shard.size < 8 {
        bail!(
            "{}: shard {:?} is shorter than 8 bytes",
            repo.label(),
            shard.path
        );
    }
    let len = hub::read_vec(repo, &shard.path, 0, 8, 8)?;
    let n = u64::from_le_bytes(len.try_into().map_err(|_| anyhow::anyhow!("short read"))?);
    if n > MAX_HEADER_BYTES || 8 + n > shard.size {
        bail!(
            "{}: shard {:?} declares a header of {n} bytes",
            repo.label(),
            shard.path
        );
    }
    let header = hub::read_vec(repo, &shard.path, 8, n, MAX_HEADER_BYTES)?;
    safetensors_dir::parse_header(&header, shard.size, Path::new(&shard.path))
        .with_context(|| format!("{}: shard header", repo.label()))
}

/// Whether a cached tensor is complete and intact for `want`.
fn cached_ok(bin: &Path, side: &Path, want: &Sidecar) -> bool {
    let Ok(text) = std::fs::read_to_string(side) else {
        return false;
    };
    let Ok(have) = serde_json::from_str::<Sidecar>(&text) else {
        return false;
    };
    let same_tensor = have.shard == want.shard
        && have.dtype == want.dtype
        && have.shape == want.shape
        && have.start == want.start
        && have.len == want.len;
    same_tensor
        && std::fs::metadata(bin).is_ok_and(|m| m.len() == want.len)
        && hash_file(bin).is_ok_and(|h| h == have.blake2b256)
}

/// Downloads one tensor's bytes into the cache (continuing a `.part`), hashes and records it.
fn fetch_tensor(
    repo: &dyn RemoteRepo,
    bin: &Path,
    side: &Path,
    mut want: Sidecar,
) -> anyhow::Result<u64> {
    let part = bin.with_extension("bin.part");
    hub::download_range_to(repo, &want.shard, want.start, want.len, &part)?;
    want.blake2b256 = hash_file(&part).with_context(|| format!("hash {}", part.display()))?;
    let tmp = side.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&want)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&part, bin).with_context(|| format!("rename {}", part.display()))?;
    std::fs::rename(&tmp, side).with_context(|| format!("rename {}", tmp.display()))?;
    Ok(want.len)
}

/// Fetches (or verifies the cached copy of) every tensor `needs` wants from `repo`, returning
/// them located in the cache, ready for [`PartialModel::load_tensor_infos`].
pub fn fetch(
    repo: &dyn RemoteRepo,
    repo_id: &str,
    revision: &str,
    cache: &Path,
    needs: &Needs,
) -> anyhow::Result<(BTreeMap<String, TensorInfo>, FetchReport)> {
    let base = repo_cache_dir(cache, repo_id);
    let commit = resolve_commit(repo, &base, revision)?;
    let dir = base.join(&commit).join("tensors");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let plan = plan(repo, &dir, needs)?;
    let mut report = FetchReport {
        commit,
        tensors: plan.tensors.len(),
        repo_bytes: plan.repo_bytes,
        ..FetchReport::default()
    };
    let mut out = BTreeMap::new();
    for (name, want) in plan.tensors {
        let bin = dir.join(format!("{name}.bin"));
        let side = dir.join(format!("{name}.json"));
        report.needed_bytes += want.len;
        let kind = safetensors_dir::kind_of(&want.dtype)
            .with_context(|| format!("cached dtype {:?}", want.dtype))?;
        let shape = want.shape.clone();
        if !cached_ok(&bin, &side, &want) {
            if bin.exists() {
                tracing::warn!(tensor = %name, "cached base-weight tensor is corrupt or stale; fetching it again");
                let _ = std::fs::remove_file(&bin);
            }
            report.downloaded_bytes += fetch_tensor(repo, &bin, &side, want.clone())
                .with_context(|| format!("fetch tensor {name} from {}", repo.label()))?;
        }
        out.insert(
            name,
            TensorInfo {
                file: bin,
                kind,
                shape,
                start: 0,
                end: want.len,
            },
        );
    }
    Ok((out, report))
}

/// Fetches (or verifies the cached copy of) one whole small file of the repository, e.g.
/// `tokenizer.json`, into `<cache>/models/<owner>--<name>/<commit>/files/`; at most `max` bytes.
pub fn fetch_file(
    repo: &dyn RemoteRepo,
    repo_id: &str,
    revision: &str,
    cache: &Path,
    file: &str,
    max: u64,
) -> anyhow::Result<PathBuf> {
    let base = repo_cache_dir(cache, repo_id);
    let commit = resolve_commit(repo, &base, revision)?;
    let dir = base.join(&commit).join("files");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let local_name = file.replace('/', "%2F");
    let bin = dir.join(&local_name);
    let side = dir.join(format!("{local_name}.json"));
    // Offline with a verified copy: use it.
    let size = match repo.list_files() {
        Ok(files) => files
            .iter()
            .find(|f| f.path == file)
            .map(|f| f.size)
            .with_context(|| format!("{}: no {file:?} in the repository", repo.label()))?,
        Err(e @ HubError::Unreachable { .. }) => {
            let saved: Sidecar = std::fs::read(&side)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or(e)?;
            saved.len
        }
        Err(e) => return Err(e.into()),
    };
    if size > max {
        bail!("{}: {file:?} is {size} bytes (limit {max})", repo.label());
    }
    let want = Sidecar {
        shard: file.to_string(),
        dtype: "file".into(),
        shape: Vec::new(),
        start: 0,
        len: size,
        blake2b256: String::new(),
    };
    if !cached_ok(&bin, &side, &want) {
        let _ = std::fs::remove_file(&bin);
        fetch_tensor(repo, &bin, &side, want)
            .with_context(|| format!("fetch {file:?} from {}", repo.label()))?;
    }
    Ok(bin)
}

struct Plan {
    tensors: BTreeMap<String, Sidecar>,
    repo_bytes: u64,
}

/// What to fetch: the plan saved for this commit and these needs (a commit never changes), else
/// from the remote headers (then saved as `plan.json`).
fn plan(repo: &dyn RemoteRepo, dir: &Path, needs: &Needs) -> anyhow::Result<Plan> {
    #[derive(Serialize, Deserialize)]
    struct Saved {
        needs: String,
        tensors: BTreeMap<String, Sidecar>,
        repo_bytes: u64,
    }
    let key = needs.key();
    let saved_path = dir.join("plan.json");
    if let Some(saved) = std::fs::read(&saved_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Saved>(&b).ok())
        .filter(|s| s.needs == key)
    {
        return Ok(Plan {
            tensors: saved.tensors,
            repo_bytes: saved.repo_bytes,
        });
    }
    let files = repo.list_files()?;
    let repo_bytes = files
        .iter()
        .filter(|f| f.path.ends_with(".safetensors"))
        .map(|f| f.size)
        .sum();
    let mut tensors = BTreeMap::new();
    for shard in needed_shards(repo, &files, needs)? {
        for (name, info) in remote_header(repo, &shard)? {
            if !needs.wants(&name) {
                continue;
            }
            let side = Sidecar {
                shard: shard.path.clone(),
                dtype: safetensors_dir::dtype_str(info.kind).to_string(),
                shape: info.shape,
                start: info.start,
                len: info.end - info.start,
                blake2b256: String::new(),
            };
            if tensors.insert(name.clone(), side).is_some() {
                bail!("{}: tensor {name:?} is in two shards", repo.label());
            }
        }
    }
    let missing: Vec<&String> = needs
        .backbone
        .iter()
        .filter(|n| !tensors.contains_key(*n))
        .take(5)
        .collect();
    if !missing.is_empty() {
        tracing::warn!(missing = ?missing, "base weights lack some backbone tensors; they keep their initial values");
    }
    let saved = Saved {
        needs: key,
        tensors: tensors.clone(),
        repo_bytes,
    };
    std::fs::write(&saved_path, serde_json::to_vec(&saved)?)
        .with_context(|| format!("write {}", saved_path.display()))?;
    Ok(Plan {
        tensors,
        repo_bytes,
    })
}

/// Bytes the partial model of `experts` needs from a checkpoint of `cfg` stored with `elem`-byte
/// elements (backbone + per-expert gate, up and down), and the bytes of the whole checkpoint.
pub fn partial_bytes(cfg: &super::ModelConfig, experts: &GroupExperts, elem: u64) -> (u64, u64) {
    let numel = |s: &[i64]| s.iter().product::<i64>() as u64;
    let backbone: u64 = naming::shared_names(cfg)
        .iter()
        .map(|(_, s)| numel(s))
        .sum();
    let per_expert = 3 * (cfg.moe_intermediate_size * cfg.hidden_size) as u64;
    let moe_layers = (0..cfg.num_hidden_layers)
        .filter(|l| cfg.is_moe_layer(*l))
        .count() as u64;
    let owned: u64 = experts
        .iter()
        .filter(|(l, _)| cfg.is_moe_layer(**l))
        .map(|(_, v)| v.len() as u64)
        .sum();
    let all = backbone + moe_layers * cfg.n_routed_experts as u64 * per_expert;
    ((backbone + owned * per_expert) * elem, all * elem)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repository of in-memory files (a hostile Hub's answers).
    struct MemRepo(BTreeMap<String, Vec<u8>>);

    impl RemoteRepo for MemRepo {
        fn label(&self) -> String {
            "mem/repo@main".into()
        }
        fn commit(&self) -> Result<String, HubError> {
            Ok("a".repeat(40))
        }
        fn list_files(&self) -> Result<Vec<RemoteFile>, HubError> {
            Ok(self
                .0
                .iter()
                .map(|(p, b)| RemoteFile {
                    path: p.clone(),
                    size: b.len() as u64,
                })
                .collect())
        }
        fn read_range(
            &self,
            file: &str,
            start: u64,
            len: u64,
            sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
        ) -> Result<(), HubError> {
            let b = self.0.get(file).ok_or(HubError::NotFound {
                what: file.to_string(),
            })?;
            let s = usize::try_from(start).unwrap_or(usize::MAX);
            let e = s.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
            let slice = b.get(s..e).ok_or(HubError::Protocol {
                what: file.to_string(),
                reason: "range past the end".into(),
            })?;
            sink(slice).map_err(|e| HubError::Io {
                what: file.to_string(),
                reason: e.to_string(),
            })
        }
    }

    fn shard(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data));
        v
    }

    fn needs() -> Needs {
        Needs {
            backbone: ["model.norm.weight".to_string()].into_iter().collect(),
            experts: GroupExperts::new(),
        }
    }

    #[test]
    fn hostile_shards_fail_with_a_clear_error() {
        let cases = [
            // Header length far past the file.
            {
                let mut v = u64::MAX.to_le_bytes().to_vec();
                v.extend_from_slice(b"{}");
                v
            },
            // A tensor whose range is not numel * element size.
            shard(
                r#"{"model.norm.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#,
                16,
            ),
            // A range past the end of the file.
            shard(
                r#"{"model.norm.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                4,
            ),
            // Overflowing shape.
            shard(
                r#"{"model.norm.weight":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,16]}}"#,
                16,
            ),
            // Not JSON.
            shard("\u{0}\u{1}garbage", 0),
        ];
        for (i, bytes) in cases.into_iter().enumerate() {
            let repo = MemRepo(
                [("model.safetensors".to_string(), bytes)]
                    .into_iter()
                    .collect(),
            );
            let cache = tempfile::tempdir().unwrap();
            let e = fetch(&repo, "mem/repo", "main", cache.path(), &needs())
                .expect_err(&format!("case {i} accepted"));
            let msg = format!("{e:#}");
            assert!(!msg.contains('\n'), "case {i}: {msg}");
        }
    }

    #[test]
    fn a_good_shard_is_fetched_and_verified() {
        let mut bytes = shard(
            r#"{"model.norm.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"other":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            0,
        );
        bytes.extend_from_slice(&[0, 0, 128, 63, 0, 0, 0, 64, 9, 9, 9, 9]);
        let repo = MemRepo(
            [("model.safetensors".to_string(), bytes)]
                .into_iter()
                .collect(),
        );
        let cache = tempfile::tempdir().unwrap();
        let (t, r) = fetch(&repo, "mem/repo", "main", cache.path(), &needs()).unwrap();
        assert_eq!((r.tensors, r.needed_bytes, r.downloaded_bytes), (1, 8, 8));
        let v = safetensors_dir::read_tensor(&t["model.norm.weight"]).unwrap();
        assert_eq!(Vec::<f32>::try_from(&v).unwrap(), [1.0, 2.0]);
        let (_, r) = fetch(&repo, "mem/repo", "main", cache.path(), &needs()).unwrap();
        assert_eq!(r.downloaded_bytes, 0, "second start comes from the cache");
    }

    proptest::proptest! {
        #[test]
        fn parse_header_never_panics(header in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400), len in 0u64..10_000) {
            let _ = safetensors_dir::parse_header(&header, len, Path::new("x"));
        }

        #[test]
        fn parse_header_bounds_every_tensor(
            shape in proptest::collection::vec(0i64..50, 0..4),
            start in 0u64..100, extra in 0u64..100, file_len in 0u64..2000,
        ) {
            let numel: i64 = shape.iter().product();
            let end = start + numel as u64 * 4 + extra;
            let h = format!(r#"{{"t":{{"dtype":"F32","shape":{shape:?},"data_offsets":[{start},{end}]}}}}"#);
            if let Ok(m) = safetensors_dir::parse_header(h.as_bytes(), file_len, Path::new("x")) {
                let t = &m["t"];
                proptest::prop_assert!(t.end <= file_len);
                proptest::prop_assert_eq!(t.end - t.start, numel as u64 * 4);
            }
        }
    }

    /// Group 0 (`exp_math`) of DeepSeek-V2-Lite (bf16 on the Hub): the bytes a miner downloads.
    #[test]
    fn group0_needs_a_fraction_of_deepseek_v2_lite() {
        let cfg = super::super::ModelConfig::deepseek_v2_lite(4096);
        let group = miner_contract::MinerConfig::default()
            .expert_group(None)
            .expect("embedded exp_math");
        let experts: GroupExperts = group
            .layers
            .keys()
            .map(|l| (*l, group.org_ids(*l)))
            .collect();
        let (need, all) = partial_bytes(&cfg, &experts, 2);
        eprintln!(
            "exp_math needs {need} of {all} bytes ({:.2} of {:.2} GB, {:.1}%)",
            need as f64 / 1e9,
            all as f64 / 1e9,
            100.0 * need as f64 / all as f64
        );
        // 15.7 B parameters in bf16 ≈ 31.4 GB; the partial model is about 3.1 B of them.
        assert!((31.0e9..32.0e9).contains(&(all as f64)), "{all}");
        assert!((6.0e9..6.5e9).contains(&(need as f64)), "{need}");
    }
}
