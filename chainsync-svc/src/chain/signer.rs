//! subxt's `Signer` over a [`miner_keys::Hotkey`] (sr25519, `MultiSignature::Sr25519`).

use miner_keys::Hotkey;
use subxt::PolkadotConfig;
use subxt::tx::Signer;
use subxt::utils::{AccountId32, MultiSignature};

/// Signs extrinsics with a hotkey.
pub struct HotkeySigner<'a> {
    key: &'a Hotkey,
}

impl<'a> HotkeySigner<'a> {
    pub fn new(key: &'a Hotkey) -> Self {
        HotkeySigner { key }
    }
}

impl Signer<PolkadotConfig> for HotkeySigner<'_> {
    fn account_id(&self) -> AccountId32 {
        AccountId32(self.key.public())
    }

    fn sign(&self, signer_payload: &[u8]) -> MultiSignature {
        // subxt already hashes payloads longer than 256 bytes, as the runtime expects.
        MultiSignature::Sr25519(self.key.sign(signer_payload))
    }
}
