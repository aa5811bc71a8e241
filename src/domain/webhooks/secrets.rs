//! Signing secrets at rest. With a key (`--webhook-secrets-key`, 32 bytes in base64)
//! each secret is sealed with XChaCha20-Poly1305 under a random nonce, bound to its
//! endpoint's id, so a database dump alone reveals nothing and a sealed secret copied
//! onto another endpoint does not open. Without a key a secret is stored as plain text
//! (marked so), and the README calls the table sensitive; a key can be set later:
//! plain secrets still open, and new ones are sealed.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use super::endpoint::SealedSecret;
use super::signature::SigningSecret;
use crate::error::{Error, Result};

const SEALED: &str = "sealed:v1:";
const PLAIN: &str = "plain:";
const NONCE_BYTES: usize = 24;

/// Seals and opens signing secrets with the deployment's key, if it has one.
#[derive(Clone)]
pub struct SecretSealer {
    cipher: Option<XChaCha20Poly1305>,
}

impl std::fmt::Debug for SecretSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretSealer(keyed: {})", self.cipher.is_some())
    }
}

impl SecretSealer {
    /// A sealer without a key: secrets are stored as plain text (marked so).
    pub fn unkeyed() -> SecretSealer {
        SecretSealer { cipher: None }
    }

    /// A sealer with the key in `key_base64` (32 bytes), or one that stores secrets
    /// as plain text when there is none; `field` names the setting in errors, which
    /// never quote the key.
    pub fn new(field: &str, key_base64: Option<&str>) -> Result<SecretSealer> {
        let cipher = match key_base64.map(str::trim).filter(|k| !k.is_empty()) {
            None => None,
            Some(text) => {
                let key = STANDARD.decode(text).map_err(|_| {
                    Error::invalid(
                        field,
                        "is not base64 (make one with `openssl rand -base64 32`)",
                    )
                })?;
                let cipher = XChaCha20Poly1305::new_from_slice(&key).map_err(|_| {
                    Error::invalid(
                        field,
                        format!("holds {} bytes; the key is 32 bytes", key.len()),
                    )
                })?;
                Some(cipher)
            }
        };
        Ok(SecretSealer { cipher })
    }

    /// Whether secrets are sealed (a key is configured).
    pub fn is_keyed(&self) -> bool {
        self.cipher.is_some()
    }

    /// The stored form of `secret`, the secret of endpoint `endpoint_id`.
    pub fn seal(&self, endpoint_id: &str, secret: &SigningSecret) -> SealedSecret {
        let text = secret.expose();
        let Some(cipher) = &self.cipher else {
            return SealedSecret(format!("{PLAIN}{text}"));
        };
        let mut nonce = [0u8; NONCE_BYTES];
        // getrandom fails only when the OS has no entropy source at all.
        getrandom::fill(&mut nonce).expect("the operating system's random number generator failed");
        let sealed = cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: text.as_bytes(),
                    aad: endpoint_id.as_bytes(),
                },
            )
            // Encryption fails only for messages beyond the cipher's length limit
            // (256 GiB); a secret is under 100 bytes.
            .expect("a signing secret is far below the cipher's length limit");
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        SealedSecret(format!("{SEALED}{}", STANDARD.encode(bytes)))
    }

    /// The secret sealed in `stored` for endpoint `endpoint_id`.
    pub fn open(&self, endpoint_id: &str, stored: &SealedSecret) -> Result<SigningSecret> {
        if let Some(text) = stored.0.strip_prefix(PLAIN) {
            return SigningSecret::parse("signing_secret", text)
                .map_err(|_| corrupt(endpoint_id, "its plain secret does not parse"));
        }
        let encoded = stored
            .0
            .strip_prefix(SEALED)
            .ok_or_else(|| corrupt(endpoint_id, "its secret has an unknown format"))?;
        let Some(cipher) = &self.cipher else {
            return Err(Error::Unavailable(format!(
                "the signing secret of webhook endpoint {endpoint_id} is sealed, and this replica has no --webhook-secrets-key"
            )));
        };
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|_| corrupt(endpoint_id, "its sealed secret is not base64"))?;
        if bytes.len() <= NONCE_BYTES {
            return Err(corrupt(endpoint_id, "its sealed secret is truncated"));
        }
        let (nonce, sealed) = bytes.split_at(NONCE_BYTES);
        let nonce: [u8; NONCE_BYTES] = nonce
            .try_into()
            .map_err(|_| corrupt(endpoint_id, "its sealed secret is truncated"))?;
        let text = cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: endpoint_id.as_bytes(),
                },
            )
            .map_err(|_| {
                Error::Unavailable(format!(
                    "the signing secret of webhook endpoint {endpoint_id} does not open with this replica's --webhook-secrets-key (a different key?)"
                ))
            })?;
        let text = String::from_utf8(text)
            .map_err(|_| corrupt(endpoint_id, "its sealed secret is not text"))?;
        SigningSecret::parse("signing_secret", &text)
            .map_err(|_| corrupt(endpoint_id, "its sealed secret does not parse"))
    }
}

fn corrupt(endpoint_id: &str, what: &str) -> Error {
    Error::Internal(format!("webhook endpoint {endpoint_id}: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

    #[test]
    fn a_sealed_secret_opens_only_with_its_key_and_its_endpoint() {
        let sealer = SecretSealer::new("key", Some(KEY)).unwrap();
        let secret = SigningSecret::generate();
        let stored = sealer.seal("we_1", &secret);
        assert!(stored.0.starts_with(SEALED));
        assert!(
            !stored.0.contains(&secret.expose()[6..]),
            "no secret text at rest"
        );
        assert_eq!(sealer.open("we_1", &stored).unwrap(), secret);
        assert!(matches!(
            sealer.open("we_2", &stored),
            Err(Error::Unavailable(_))
        ));
        let other = SecretSealer::new("key", Some(&STANDARD.encode([7u8; 32]))).unwrap();
        assert!(matches!(
            other.open("we_1", &stored),
            Err(Error::Unavailable(_))
        ));
        let unkeyed = SecretSealer::new("key", None).unwrap();
        assert!(matches!(
            unkeyed.open("we_1", &stored),
            Err(Error::Unavailable(_))
        ));
        assert_ne!(
            sealer.seal("we_1", &secret),
            stored,
            "a fresh nonce each time"
        );
    }

    #[test]
    fn without_a_key_secrets_are_marked_plain_and_still_open_once_a_key_is_set() {
        let secret = SigningSecret::generate();
        let stored = SecretSealer::new("key", None)
            .unwrap()
            .seal("we_1", &secret);
        assert_eq!(stored.0, format!("plain:{}", secret.expose()));
        let keyed = SecretSealer::new("key", Some(KEY)).unwrap();
        assert_eq!(keyed.open("we_1", &stored).unwrap(), secret);
    }

    #[test]
    fn a_bad_key_is_refused_without_being_quoted() {
        for bad in ["not base64!", "c2hvcnQ="] {
            let message = SecretSealer::new("webhook_secrets_key", Some(bad))
                .unwrap_err()
                .to_string();
            assert!(message.contains("webhook_secrets_key"), "{message}");
            assert!(!message.contains(bad), "{message}");
        }
    }
}
