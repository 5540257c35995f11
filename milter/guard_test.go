package milter

import "testing"

// The SIZE= hint of a MAIL packet, which go-milter does not pass on.
func TestMailSize(t *testing.T) {
	for _, tc := range []struct {
		data string
		want int64
	}{
		{"<a@example.org>\x00SIZE=1234\x00", 1234},
		{"<a@example.org>\x00BODY=8BITMIME\x00size=99\x00", 99},
		{"<a@example.org>\x00", 0},
		{"<a@example.org>", 0},
		{"<a@example.org>\x00SIZE=-5\x00", 0},
		{"<a@example.org>\x00SIZE=lots\x00", 0},
		{"<a@example.org>\x00SIZE=\x00", 0},
	} {
		if got := mailSize([]byte(tc.data)); got != tc.want {
			t.Errorf("mailSize(%q) = %d, want %d", tc.data, got, tc.want)
		}
	}
}
