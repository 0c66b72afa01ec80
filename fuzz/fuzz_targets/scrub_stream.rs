//! Response scrubbing, differentially: a body cut into arbitrary chunks through the streaming
//! scrubber must come out exactly as the whole body scrubbed at once, and never hold a secret
//! value (values are drawn from letters no placeholder uses, so a match can only come from the
//! upstream's bytes). The SSE replacer is checked the same way against one-chunk input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_api::config::Secret;
use matchlock_net::secrets::{BodyTransform, Scrubber, SseDataReplacer};

/// Letters outside `SANDBOX_SECRET_` and lowercase hex.
fn letter(b: u8) -> u8 {
    b"ghijklmnopqrstuvwxyz"[usize::from(b) % 20]
}

fn streamed(transform: &mut dyn BodyTransform, body: &[u8], cuts: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    for &cut in cuts {
        let (chunk, tail) = rest.split_at(usize::from(cut).min(rest.len()));
        out.extend_from_slice(&transform.push(chunk));
        rest = tail;
    }
    out.extend_from_slice(&transform.push(rest));
    out.extend_from_slice(&transform.finish());
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    // [n values][len, letters]* [n cuts][cut]* body
    let Some((&count, mut rest)) = data.split_first() else { return };
    let mut values = Vec::new();
    for _ in 0..count % 4 {
        let Some((&len, tail)) = rest.split_first() else { return };
        let len = usize::from(len % 24) + 1;
        if tail.len() < len {
            return;
        }
        values.push(tail[..len].iter().copied().map(letter).collect::<Vec<u8>>());
        rest = &tail[len..];
    }
    let Some((&cut_count, tail)) = rest.split_first() else { return };
    let cut_count = usize::from(cut_count % 16).min(tail.len());
    let (cuts, body) = tail.split_at(cut_count);

    let secrets: Vec<Secret> = values
        .iter()
        .enumerate()
        .map(|(i, v)| Secret::new(format!("S{i}"), String::from_utf8(v.clone()).expect("ASCII"), vec!["api.test".into()]))
        .collect();
    let refs: Vec<&Secret> = secrets.iter().collect();
    let scrubber = Scrubber::new(&refs);
    let whole = scrubber.scrub(body);
    let out = streamed(&mut Scrubber::new(&refs), body, cuts);
    assert_eq!(out, whole, "streamed scrubbing differs from scrubbing the whole body");
    for value in &values {
        assert!(!contains(&out, value), "a secret value survived scrubbing");
    }

    let pairs: Vec<(Vec<u8>, Vec<u8>)> = values.iter().map(|v| (v.clone(), b"X".to_vec())).collect();
    let once = streamed(&mut SseDataReplacer::new(pairs.clone()), body, &[]);
    let chunked = streamed(&mut SseDataReplacer::new(pairs), body, cuts);
    assert_eq!(chunked, once, "chunked SSE replacement differs from one chunk");
});
