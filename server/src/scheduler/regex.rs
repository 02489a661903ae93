//! A small backtracking regular-expression matcher for `regexp` constraints, so that the server
//! needs no regex crate. Supported: literals, `.`, classes (`[a-z_]`, `[^0-9]`), escapes
//! (`\d \w \s \D \W \S` and escaped metacharacters), quantifiers (`* + ? {n} {n,} {n,m}`, greedy),
//! anchors `^ $`, groups `( )` (`(?:` accepted) and alternation `|`. Like Go's
//! `regexp.MatchString` (which Nomad uses) the match is unanchored. Not supported: lazy
//! quantifiers, backreferences, flags, Unicode classes. A step budget bounds pathological patterns;
//! running out counts as no match.

/// Whether `pattern` matches anywhere in `text`. Err when the pattern does not parse.
pub fn is_match(pattern: &str, text: &str) -> Result<bool, String> {
    let mut p = Parser { chars: pattern.chars().collect(), pos: 0 };
    let alt = p.alt()?;
    if p.pos != p.chars.len() {
        return Err(format!("unexpected {:?} at {} in {pattern:?}", p.chars[p.pos], p.pos));
    }
    let mut m = Matcher { text: text.chars().collect(), steps: 0 };
    for start in 0..=m.text.len() {
        if alt.iter().any(|seq| m.seq(seq, start, &mut |_, _| true)) {
            return Ok(true);
        }
        if m.steps > STEP_BUDGET {
            return Ok(false);
        }
    }
    Ok(false)
}

const STEP_BUDGET: u32 = 200_000;

#[derive(Debug)]
enum Node {
    Char(char),
    Any,
    /// Ranges (inclusive) and whether the class is negated.
    Class(Vec<(char, char)>, bool),
    Start,
    End,
    Group(Vec<Vec<Node>>),
    Repeat(Box<Node>, u32, Option<u32>),
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Result<char, String> {
        let c = self.peek().ok_or_else(|| "unexpected end of pattern".to_string())?;
        self.pos += 1;
        Ok(c)
    }

    fn alt(&mut self) -> Result<Vec<Vec<Node>>, String> {
        let mut alts = vec![self.seq()?];
        while self.peek() == Some('|') {
            self.pos += 1;
            alts.push(self.seq()?);
        }
        Ok(alts)
    }

    fn seq(&mut self) -> Result<Vec<Node>, String> {
        let mut seq = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom()?;
            seq.push(self.quantified(atom)?);
        }
        Ok(seq)
    }

    fn atom(&mut self) -> Result<Node, String> {
        Ok(match self.next()? {
            '.' => Node::Any,
            '^' => Node::Start,
            '$' => Node::End,
            '(' => {
                if self.chars[self.pos..].starts_with(&['?', ':']) {
                    self.pos += 2;
                }
                let inner = self.alt()?;
                if self.next()? != ')' {
                    return Err("missing )".into());
                }
                Node::Group(inner)
            }
            '[' => self.class()?,
            '\\' => escape(self.next()?),
            c @ ('*' | '+' | '?') => return Err(format!("nothing to repeat before {c:?}")),
            c => Node::Char(c),
        })
    }

    fn class(&mut self) -> Result<Node, String> {
        let negated = self.peek() == Some('^');
        if negated {
            self.pos += 1;
        }
        let mut ranges = Vec::new();
        let mut first = true;
        loop {
            let c = self.next()?;
            if c == ']' && !first {
                break;
            }
            first = false;
            let lo = if c == '\\' {
                match escape(self.next()?) {
                    Node::Char(c) => c,
                    Node::Class(rs, false) => {
                        ranges.extend(rs);
                        continue;
                    }
                    _ => return Err("negated escape inside a class is not supported".into()),
                }
            } else {
                c
            };
            if self.peek() == Some('-') && self.chars.get(self.pos + 1).is_some_and(|&c| c != ']') {
                self.pos += 1;
                let hi = self.next()?;
                ranges.push((lo, hi));
            } else {
                ranges.push((lo, lo));
            }
        }
        Ok(Node::Class(ranges, negated))
    }

    fn quantified(&mut self, atom: Node) -> Result<Node, String> {
        let (min, max) = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => return self.braces(atom),
            _ => return Ok(atom),
        };
        self.pos += 1;
        Ok(Node::Repeat(Box::new(atom), min, max))
    }

    fn braces(&mut self, atom: Node) -> Result<Node, String> {
        self.pos += 1;
        let mut body = String::new();
        loop {
            match self.next()? {
                '}' => break,
                c => body.push(c),
            }
        }
        let num = |s: &str| s.trim().parse::<u32>().map_err(|_| format!("bad repeat {{{body}}}"));
        let (min, max) = match body.split_once(',') {
            None => {
                let n = num(&body)?;
                (n, Some(n))
            }
            Some((lo, "")) => (num(lo)?, None),
            Some((lo, hi)) => (num(lo)?, Some(num(hi)?)),
        };
        Ok(Node::Repeat(Box::new(atom), min, max))
    }
}

fn escape(c: char) -> Node {
    let digits = vec![('0', '9')];
    let word = vec![('a', 'z'), ('A', 'Z'), ('0', '9'), ('_', '_')];
    let space = vec![(' ', ' '), ('\t', '\t'), ('\n', '\n'), ('\r', '\r'), ('\x0b', '\x0c')];
    match c {
        'd' => Node::Class(digits, false),
        'D' => Node::Class(digits, true),
        'w' => Node::Class(word, false),
        'W' => Node::Class(word, true),
        's' => Node::Class(space, false),
        'S' => Node::Class(space, true),
        't' => Node::Char('\t'),
        'n' => Node::Char('\n'),
        c => Node::Char(c),
    }
}

struct Matcher {
    text: Vec<char>,
    steps: u32,
}

/// The rest of the match, given the matcher and the position reached.
type Cont<'a> = dyn FnMut(&mut Matcher, usize) -> bool + 'a;

impl Matcher {
    fn node(&mut self, node: &Node, pos: usize, k: &mut Cont<'_>) -> bool {
        self.steps += 1;
        if self.steps > STEP_BUDGET {
            return false;
        }
        let c = self.text.get(pos).copied();
        match node {
            Node::Char(want) => c == Some(*want) && k(self, pos + 1),
            Node::Any => c.is_some_and(|c| c != '\n') && k(self, pos + 1),
            Node::Class(ranges, negated) => {
                c.is_some_and(|c| ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated) && k(self, pos + 1)
            }
            Node::Start => pos == 0 && k(self, pos),
            Node::End => pos == self.text.len() && k(self, pos),
            Node::Group(alts) => alts.iter().any(|seq| self.seq(seq, pos, k)),
            Node::Repeat(inner, min, max) => self.repeat(inner, *min, *max, 0, pos, k),
        }
    }

    fn seq(&mut self, seq: &[Node], pos: usize, k: &mut Cont<'_>) -> bool {
        match seq.split_first() {
            None => k(self, pos),
            Some((first, rest)) => self.node(first, pos, &mut |m: &mut Matcher, p| m.seq(rest, p, k)),
        }
    }

    fn repeat(
        &mut self,
        inner: &Node,
        min: u32,
        max: Option<u32>,
        done: u32,
        pos: usize,
        k: &mut Cont<'_>,
    ) -> bool {
        // Greedy: one more repetition first (never an empty one, which would loop), then stop.
        if max.is_none_or(|m| done < m)
            && self.node(inner, pos, &mut |m: &mut Matcher, p| p != pos && m.repeat(inner, min, max, done + 1, p, k))
        {
            return true;
        }
        done >= min && k(self, pos)
    }
}

#[cfg(test)]
mod tests {
    use super::is_match;

    #[test]
    fn matches_like_go_regexp() {
        let cases: &[(&str, &str, bool)] = &[
            ("linux", "linux", true),
            ("lin", "linux", true),
            ("^lin$", "linux", false),
            ("^linux$", "linux", true),
            ("^(linux|darwin)$", "darwin", true),
            ("^(linux|darwin)$", "windows", false),
            (r"^\d+\.\d+$", "12.4", true),
            (r"^\d+\.\d+$", "12x4", false),
            ("^a[0-9a-f]{2,3}z$", "a0fz", true),
            ("^a[0-9a-f]{2,3}z$", "a0fffz", false),
            ("^[^x]*$", "abc", true),
            ("^[^x]*$", "axc", false),
            ("colou?r", "color", true),
            ("^(?:ab)+$", "ababab", true),
            ("^(a*)*b$", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaac", false),
            ("", "anything", true),
            ("^$", "", true),
            ("A100|H100", "NVIDIA H100 80GB", true),
        ];
        for (pat, text, want) in cases {
            assert_eq!(is_match(pat, text), Ok(*want), "{pat:?} ~ {text:?}");
        }
    }

    #[test]
    fn bad_patterns_are_errors() {
        for pat in ["(ab", "*a", "a{x}", "[ab"] {
            assert!(is_match(pat, "ab").is_err(), "{pat:?}");
        }
    }
}
