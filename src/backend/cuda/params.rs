//! Named kernel arguments. A launcher with more than a handful of arguments builds them as
//! `(parameter name, value)` pairs from a struct whose fields the call site names, so two
//! arguments of one type cannot trade places unnoticed; the launch passes the values
//! ([`unnamed`]), and a unit test per launcher holds the names, kinds and order to the
//! parameter list in the kernel's own source ([`kernel_params`]).

use super::Arg;

/// The arguments of a named argument list, in order.
pub(super) fn unnamed<const N: usize>(named: [(&'static str, Arg); N]) -> [Arg; N] {
    named.map(|(_, a)| a)
}

/// A kernel's parameter list as written in its source: `(name, kind)` per parameter, kind
/// `'P'` pointer, `'I'` int, `'L'` long long, `'F'` float. The list is the text after `marker`
/// up to its closing parenthesis when `marker` ends with `(`, else up to the next `#define`
/// (a parameter-list macro).
#[cfg(test)]
pub(super) fn kernel_params(src: &str, marker: &str) -> Vec<(String, char)> {
    let at = src
        .find(marker)
        .expect("the marker is in the kernel source")
        + marker.len();
    let rest = &src[at..];
    let text = if marker.ends_with('(') {
        &rest[..rest.find(')').expect("a closing parenthesis")]
    } else {
        &rest[..rest.find("#define").unwrap_or(rest.len())]
    };
    text.replace('\\', " ")
        .split(',')
        .map(|p| {
            let p = p.trim();
            let name = p
                .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("");
            let kind = if p.contains('*') {
                'P'
            } else if p.starts_with("long long") {
                'L'
            } else if p.starts_with("int") {
                'I'
            } else if p.starts_with("float") {
                'F'
            } else {
                panic!("unexpected kernel parameter `{p}`")
            };
            (name.to_string(), kind)
        })
        .collect()
}

/// A named argument list as [`kernel_params`] writes a parameter list.
#[cfg(test)]
pub(super) fn listed(named: &[(&'static str, Arg)]) -> Vec<(String, char)> {
    named
        .iter()
        .map(|(n, a)| {
            let kind = match a {
                Arg::P(_) => 'P',
                Arg::I(_) => 'I',
                Arg::L(_) => 'L',
                Arg::F(_) => 'F',
                Arg::Perm(_) => 'S',
            };
            (n.to_string(), kind)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_lists_are_read_as_written() {
        let src = "// k_<t>(int n)\nvoid k_f32(const float* x, float* y, long long n,\n \
                   int c, float eps) {}";
        assert_eq!(
            kernel_params(src, "k_f32("),
            [("x", 'P'), ("y", 'P'), ("n", 'L'), ("c", 'I'), ("eps", 'F')]
                .map(|(n, k)| (n.to_string(), k))
        );
        let named = [("x", Arg::P(1)), ("n", Arg::L(2)), ("eps", Arg::F(0.5))];
        assert_eq!(
            listed(&named),
            [("x", 'P'), ("n", 'L'), ("eps", 'F')].map(|(n, k)| (n.to_string(), k))
        );
        assert_eq!(unnamed(named).len(), 3);
    }
}
