//! Standard Webhooks signatures, as OpenAI signs its webhooks and the official SDKs'
//! `client.webhooks.unwrap` verifies them: `webhook-signature: v1,<base64 of
//! HMAC-SHA256(secret, "<webhook-id>.<webhook-timestamp>.<body>")>`, with a `whsec_`
//! secret (base64 of the key bytes). Several signatures, space-separated, let a
//! receiver rotate its secret without downtime.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

/// The prefix of a secret's text form.
const PREFIX: &str = "whsec_";

/// Bytes of a generated secret.
const GENERATED_BYTES: usize = 32;

/// Fewest and most bytes of a secret (the Standard Webhooks range).
const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// A signing secret. Its text form is shown to the endpoint's owner once; `Debug`
/// never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(Vec<u8>);

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningSecret(…{})", self.hint())
    }
}

impl SigningSecret {
    /// A new secret from the operating system's random number generator.
    pub fn generate() -> SigningSecret {
        let mut bytes = vec![0; GENERATED_BYTES];
        // getrandom fails only when the OS has no entropy source at all, in which case
        // no secret could be made safely anyway.
        getrandom::fill(&mut bytes).expect("the operating system's random number generator failed");
        SigningSecret(bytes)
    }

    /// Reads a secret's text form, `whsec_<base64>` (the prefix may be left out);
    /// `field` names the input in the error, which never quotes the secret.
    pub fn parse(field: &str, text: &str) -> Result<SigningSecret> {
        let encoded = text.strip_prefix(PREFIX).unwrap_or(text);
        let bytes = STANDARD.decode(encoded).map_err(|_| {
            Error::invalid(field, "is not a `whsec_` secret (base64 after the prefix)")
        })?;
        if !SECRET_BYTES.contains(&bytes.len()) {
            return Err(Error::invalid(
                field,
                format!(
                    "holds {} bytes; a signing secret holds {} to {}",
                    bytes.len(),
                    SECRET_BYTES.start(),
                    SECRET_BYTES.end()
                ),
            ));
        }
        Ok(SigningSecret(bytes))
    }

    /// The text form, `whsec_<base64>`.
    pub fn expose(&self) -> String {
        format!("{PREFIX}{}", STANDARD.encode(&self.0))
    }

    /// The last four characters of the text form, to tell secrets apart.
    pub fn hint(&self) -> String {
        let text = self.expose();
        text[text.len() - 4..].to_owned()
    }

    /// The signature of one delivery: `v1,<base64>`.
    pub fn sign(&self, webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self
            .mac(webhook_id, timestamp, body)
            .finalize()
            .into_bytes();
        format!("v1,{}", STANDARD.encode(tag))
    }

    fn mac(&self, webhook_id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        // HMAC takes a key of any length; the error type exists for other MACs.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(webhook_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// Whether any `v1` signature of a `webhook-signature` header is this secret's for
    /// the delivery, compared in constant time.
    pub fn verifies(&self, webhook_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        header.split(' ').any(|signature| {
            let Some(encoded) = signature.strip_prefix("v1,") else {
                return false;
            };
            let Ok(tag) = STANDARD.decode(encoded) else {
                return false;
            };
            self.mac(webhook_id, timestamp, body)
                .verify_slice(&tag)
                .is_ok()
        })
    }
}

/// The `webhook-signature` header of a delivery signed with each of `secrets` (the
/// current one, and during a rotation's overlap the previous one): space-separated.
pub fn signature_header(
    secrets: &[&SigningSecret],
    webhook_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .iter()
        .map(|secret| secret.sign(webhook_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference vector of the Standard Webhooks specification's test suite.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn the_specification_vector_signs_and_verifies() {
        let secret = SigningSecret::parse("secret", SECRET).unwrap();
        assert_eq!(secret.sign(ID, TIMESTAMP, BODY), SIGNATURE);
        assert!(secret.verifies(ID, TIMESTAMP, BODY, SIGNATURE));
        let bare = SigningSecret::parse("secret", &SECRET[PREFIX.len()..]).unwrap();
        assert_eq!(bare, secret, "the prefix may be left out");
        assert_eq!(secret.expose(), SECRET);
    }

    #[test]
    fn anything_changed_fails_to_verify() {
        let secret = SigningSecret::parse("secret", SECRET).unwrap();
        assert!(!secret.verifies(ID, TIMESTAMP, br#"{"test": 2432232315}"#, SIGNATURE));
        assert!(!secret.verifies("msg_other", TIMESTAMP, BODY, SIGNATURE));
        assert!(!secret.verifies(ID, TIMESTAMP + 1, BODY, SIGNATURE));
        assert!(!secret.verifies(
            ID,
            TIMESTAMP,
            BODY,
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        ));
        assert!(!secret.verifies(ID, TIMESTAMP, BODY, "v1,not base64"));
        assert!(!secret.verifies(ID, TIMESTAMP, BODY, ""));
        let other = SigningSecret::generate();
        assert!(!other.verifies(ID, TIMESTAMP, BODY, SIGNATURE));
    }

    #[test]
    fn during_a_rotation_both_secrets_verify_one_header() {
        let (old, new) = (SigningSecret::generate(), SigningSecret::generate());
        let header = signature_header(&[&new, &old], ID, TIMESTAMP, BODY);
        assert_eq!(header.split(' ').count(), 2);
        assert!(new.verifies(ID, TIMESTAMP, BODY, &header));
        assert!(old.verifies(ID, TIMESTAMP, BODY, &header));
        let after = signature_header(&[&new], ID, TIMESTAMP, BODY);
        assert!(!old.verifies(ID, TIMESTAMP, BODY, &after));
    }

    #[test]
    fn generated_secrets_are_distinct_and_read_back() {
        let (a, b) = (SigningSecret::generate(), SigningSecret::generate());
        assert_ne!(a, b);
        assert!(a.expose().starts_with(PREFIX));
        assert_eq!(SigningSecret::parse("secret", &a.expose()).unwrap(), a);
        assert_eq!(a.hint().len(), 4);
        assert!(a.expose().ends_with(&a.hint()));
        assert!(
            !format!("{a:?}").contains(&a.expose()),
            "Debug hides the secret"
        );
    }

    #[test]
    fn malformed_secrets_are_refused_without_quoting_them() {
        let short = format!("{PREFIX}{}", STANDARD.encode([7u8; 16]));
        let long = format!("{PREFIX}{}", STANDARD.encode([7u8; 65]));
        for bad in [
            "",
            "whsec_",
            "whsec_!!!!",
            "not base64 at all",
            &short,
            &long,
        ] {
            let error = SigningSecret::parse("signing_secret", bad).unwrap_err();
            match &error {
                Error::InvalidArgument { field, reason } => {
                    assert_eq!(field, "signing_secret");
                    assert!(bad.len() < 8 || !reason.contains(bad), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
