//! Weighted, seeded interleave of document sources with a held-out split and a resumable
//! position.

use serde::{Deserialize, Serialize};

use super::DataError;
use super::source::{DocReader, SourceSpec};

/// Seed of the interleave, as in the reference (`interleave_datasets(seed=42)`).
pub const INTERLEAVE_SEED: u64 = 42;

/// SplitMix64: tiny, stable across platforms and versions, state is one `u64` (serializable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// FNV-1a 64 of the document text: the stable hash that assigns documents to the held-out split.
pub fn doc_hash(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// True if the document belongs to the held-out (evaluation) split, never to the training stream.
pub fn is_held_out(text: &str, vali_fraction: f64) -> bool {
    let bucket = doc_hash(text) % 10_000;
    (bucket as f64) < vali_fraction * 10_000.0
}

/// Position of one source: how far its reader got and how many training documents it gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    pub name: String,
    /// Completed passes over the source (the stream restarts a source when it ends).
    pub epoch: u64,
    /// Documents read in the current pass (training and held-out alike).
    pub next_doc: u64,
    /// Training documents taken from this source since the stream began.
    pub consumed: u64,
    /// Hub sources: the commit the dataset is read at, the shard being read and the documents
    /// read in it (a resume continues there without reading earlier shards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubPosition>,
}

/// Where a Hub source stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubPosition {
    pub commit: String,
    pub shard: u64,
    pub shard_doc: u64,
}

/// Where the training stream stands; saved with each checkpoint and restored on resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub rng_state: u64,
    pub sources: Vec<SourcePosition>,
}

struct OpenSource {
    spec: SourceSpec,
    reader: DocReader,
    pos: SourcePosition,
}

/// The infinite training stream: picks a source with probability proportional to its weight,
/// takes its next non-held-out document; a source that ends is reopened (epoch + 1).
pub struct TrainStream {
    sources: Vec<OpenSource>,
    cumulative: Vec<f64>,
    rng: SplitMix64,
    vali_fraction: f64,
}

impl TrainStream {
    pub fn new(specs: &[SourceSpec], vali_fraction: f64) -> Result<Self, DataError> {
        Self::build(specs, vali_fraction, INTERLEAVE_SEED)
    }

    fn build(specs: &[SourceSpec], vali_fraction: f64, seed: u64) -> Result<Self, DataError> {
        if specs.is_empty() {
            return Err(DataError::Config("no dataset sources".into()));
        }
        let mut cumulative = Vec::with_capacity(specs.len());
        let mut total = 0.0;
        for s in specs {
            if !(s.weight.is_finite() && s.weight > 0.0) {
                return Err(DataError::Config(format!(
                    "source {} has weight {}, expected > 0",
                    s.name, s.weight
                )));
            }
            total += s.weight;
            cumulative.push(total);
        }
        for c in &mut cumulative {
            *c /= total;
        }
        let sources = specs
            .iter()
            .map(|spec| {
                Ok(OpenSource {
                    reader: spec.open()?,
                    pos: SourcePosition {
                        name: spec.name.clone(),
                        epoch: 0,
                        next_doc: 0,
                        consumed: 0,
                        hub: None,
                    },
                    spec: spec.clone(),
                })
            })
            .collect::<Result<Vec<_>, DataError>>()?;
        Ok(TrainStream {
            sources,
            cumulative,
            rng: SplitMix64(seed),
            vali_fraction,
        })
    }

    /// Rebuilds the stream at a saved position (the sources must be the same, in the same order).
    pub fn resume(
        specs: &[SourceSpec],
        vali_fraction: f64,
        pos: &DataPosition,
    ) -> Result<Self, DataError> {
        let mut s = Self::build(specs, vali_fraction, pos.rng_state)?;
        if pos.sources.len() != s.sources.len() {
            return Err(DataError::Resume(format!(
                "saved position has {} sources, config has {}",
                pos.sources.len(),
                s.sources.len()
            )));
        }
        for (src, saved) in s.sources.iter_mut().zip(&pos.sources) {
            if src.spec.name != saved.name {
                return Err(DataError::Resume(format!(
                    "saved source {} but config has {}",
                    saved.name, src.spec.name
                )));
            }
            if let Some(h) = &saved.hub {
                src.reader = src.spec.open_at(Some(&h.commit))?;
                if src.reader.seek_shard(h.shard, h.shard_doc, saved.next_doc) {
                    src.pos = saved.clone();
                    continue;
                }
            }
            for _ in 0..saved.next_doc {
                if src.reader.next_doc()?.is_none() {
                    return Err(DataError::Resume(format!(
                        "source {} ended before saved document {}",
                        saved.name, saved.next_doc
                    )));
                }
            }
            src.pos = saved.clone();
        }
        Ok(s)
    }

    pub fn position(&self) -> DataPosition {
        DataPosition {
            rng_state: self.rng.0,
            sources: self.sources.iter().map(|s| s.pos.clone()).collect(),
        }
    }

    /// The next training document and the index of the source it came from.
    pub fn next_doc(&mut self) -> Result<(usize, String), DataError> {
        let u = self.rng.next_f64();
        let idx = self
            .cumulative
            .iter()
            .position(|c| u < *c)
            .unwrap_or(self.sources.len() - 1);
        let src = &mut self.sources[idx];
        let mut reopened = false;
        loop {
            match src.reader.next_doc()? {
                Some(doc) => {
                    src.pos.next_doc = src.reader.index;
                    src.pos.hub = src
                        .reader
                        .shard_position()
                        .map(|(commit, shard, shard_doc)| HubPosition {
                            commit,
                            shard,
                            shard_doc,
                        });
                    if is_held_out(&doc, self.vali_fraction) {
                        continue;
                    }
                    src.pos.consumed += 1;
                    return Ok((idx, doc));
                }
                None => {
                    // A whole pass within this call gave nothing: the source is empty or all held out.
                    if reopened {
                        return Err(DataError::Config(format!(
                            "source {} has no training documents",
                            src.spec.name
                        )));
                    }
                    reopened = true;
                    let commit = src.reader.shard_position().map(|(c, _, _)| c);
                    src.reader = src.spec.open_at(commit.as_deref())?;
                    src.pos.epoch += 1;
                    src.pos.next_doc = 0;
                }
            }
        }
    }
}

/// The held-out documents, interleaved with the same weights (seed 43), one pass, at most `n`.
pub fn held_out_docs(
    specs: &[SourceSpec],
    vali_fraction: f64,
    n: usize,
) -> Result<Vec<String>, DataError> {
    let mut s = TrainStream::build(specs, vali_fraction, INTERLEAVE_SEED + 1)?;
    let mut done = vec![false; s.sources.len()];
    let mut out = Vec::with_capacity(n);
    while out.len() < n && done.iter().any(|d| !d) {
        let u = s.rng.next_f64();
        let idx = s
            .cumulative
            .iter()
            .position(|c| u < *c)
            .unwrap_or(s.sources.len() - 1);
        if done[idx] {
            continue;
        }
        let src = &mut s.sources[idx];
        loop {
            match src.reader.next_doc()? {
                Some(doc) if is_held_out(&doc, vali_fraction) => {
                    out.push(doc);
                    break;
                }
                Some(_) => continue,
                None => {
                    done[idx] = true;
                    break;
                }
            }
        }
    }
    Ok(out)
}
