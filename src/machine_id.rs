//! The machine id, declared once: hearth makes ids, 10 lowercase hex characters (5
//! random bytes). Short enough that `<prefix><id>` fits a Linux interface name;
//! lowercase only, as ids end up in interface and file names, where `AB` and `ab` must
//! not be two machines. Everything that checks, parses or makes an id comes here.

/// Length of a machine id, in characters.
pub const MACHINE_ID_LEN: usize = 10;

/// Whether `text` has a machine id's shape.
pub fn is_machine_id(text: &str) -> bool {
    parse(text).is_some()
}

/// The id's five bytes, when it has the shape.
pub fn parse(text: &str) -> Option<[u8; MACHINE_ID_LEN / 2]> {
    if text.len() != MACHINE_ID_LEN
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; MACHINE_ID_LEN / 2];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// A fresh random machine id.
pub fn new_machine_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; MACHINE_ID_LEN / 2];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shape_is_ten_lowercase_hex_characters() {
        assert!(is_machine_id("0123456789"));
        assert!(is_machine_id("abcdef0123"));
        assert_eq!(parse("0a1b2c3d4e"), Some([0x0a, 0x1b, 0x2c, 0x3d, 0x4e]));
        for bad in [
            "",
            "012345678",
            "01234567890",
            "ABCDEF0123",
            "abcdefg123",
            "../../etc",
            "０１２３４",
        ] {
            assert!(!is_machine_id(bad), "{bad:?}");
        }
        let made = new_machine_id().expect("entropy");
        assert!(is_machine_id(&made), "{made}");
    }
}
