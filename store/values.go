package store

import (
	"context"
	"fmt"
	"strings"
)

// ValueRecord is one record found about a value of an attribute.
type ValueRecord struct {
	Entry
	// Rule is the rule instance that wrote the key ("ratelimit:1").
	Rule string
	// About is the value the record is about, as attr=value[,attr=value…]
	// unescaped: the whole compound value of a compound key.
	About string
}

// FindValue lists what is stored about a value of one or more attributes
// (a SASL login; a compound "sasl_username,recipient_domain" value): the
// keys tagged attrs[0]=values[0] that also hold every further
// attr=value. Values are compared as the rules store them, in lower case.
func FindValue(ctx context.Context, st Store, attrs, values []string) ([]ValueRecord, error) {
	if len(attrs) == 0 || len(attrs) != len(values) {
		return nil, fmt.Errorf("find value: %d attributes for %d values", len(attrs), len(values))
	}
	for _, a := range attrs {
		if !isWord(a) {
			return nil, fmt.Errorf("find value: %q is not an attribute name", a)
		}
	}
	want := make([]string, len(values))
	for i := range values {
		want[i] = strings.ToLower(values[i])
	}
	keys, err := st.Scan(ctx, ClientPrefix(ValueSeg(attrs[0], want[0])))
	if err != nil {
		return nil, fmt.Errorf("find %s=%s: %w", attrs[0], want[0], err)
	}
	var out []ValueRecord
	for _, k := range keys {
		pk, ok := ParseKey(k)
		if !ok {
			continue
		}
		about := []string{attrs[0] + "=" + want[0]}
		have := map[string]string{}
		for _, s := range pk.Segs {
			if s.Kind == SegValue {
				have[s.Word] = s.Text
				about = append(about, s.Word+"="+s.Text)
			}
		}
		match := true
		for i := 1; i < len(attrs); i++ {
			if v, ok := have[attrs[i]]; !ok || v != want[i] {
				match = false
			}
		}
		if !match {
			continue
		}
		e, found, err := st.Inspect(ctx, k)
		if err != nil {
			return nil, fmt.Errorf("find %s=%s: %w", attrs[0], want[0], err)
		}
		if found {
			out = append(out, ValueRecord{Entry: e, Rule: pk.Rule(), About: strings.Join(about, ",")})
		}
	}
	return out, nil
}

// ForgetValue deletes what FindValue finds, and returns it.
func ForgetValue(ctx context.Context, st Store, attrs, values []string) ([]ValueRecord, error) {
	found, err := FindValue(ctx, st, attrs, values)
	if err != nil || len(found) == 0 {
		return found, err
	}
	keys := make([]string, len(found))
	for i, r := range found {
		keys[i] = r.Key
	}
	// One hash tag: one Delete, one Redis Cluster slot.
	if err := st.Delete(ctx, keys...); err != nil {
		return nil, fmt.Errorf("forget %s=%s: %w", attrs[0], values[0], err)
	}
	return found, nil
}
