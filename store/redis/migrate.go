package redis

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/policyd-mail/policyd/store"
)

// migrateLua moves a record of an earlier key shape to its key in the
// grammar (store.MigrateKey), adding its counts to a record already
// there: a daemon of this version may have counted the client under the
// new key before the migration reached the old one. KEYS: old, new (one
// hash tag, as MigrateKey keeps it). Returns 1 when it moved something.
const migrateLua = `
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  return 1
end
if t ~= 'hash' or redis.call('TYPE', KEYS[2]).ok ~= 'hash' then
  return 0
end
local f = redis.call('HGETALL', KEYS[1])
for i = 1, #f, 2 do
  redis.call('HINCRBY', KEYS[2], f[i], f[i + 1])
end
redis.call('DEL', KEYS[1])
return 1
`

var migrateScript = goredis.NewScript(migrateLua)

// MigrateKeys moves the records of an earlier key shape (client_stats'
// networks before @NET) to their keys in the grammar, and returns how
// many it moved. Open runs it once in the background when Redis answers;
// it is idempotent, so a fleet's daemons may run it side by side.
func (s *Store) MigrateKeys(ctx context.Context) (int, error) {
	// Only keys with a network after the tag can be of the old shape.
	const pattern = store.Prefix + "{*}:*/*"
	var moved atomic.Int64
	each := func(ctx context.Context, node *goredis.Client) error {
		var firstErr error
		err := scanNode(ctx, node, pattern, func(k string) {
			nk, ok := store.MigrateKey(k)
			if !ok || firstErr != nil {
				return
			}
			cctx, cancel := context.WithTimeout(ctx, max(s.opt.Timeout, time.Second))
			n, err := migrateScript.Run(cctx, node, []string{k, nk}).Int()
			cancel()
			if err != nil {
				firstErr = fmt.Errorf("migrate %s: %w", k, err)
				return
			}
			moved.Add(int64(n))
		})
		if err != nil {
			return err
		}
		return firstErr
	}
	var err error
	switch c := s.c.(type) {
	case *goredis.ClusterClient:
		err = c.ForEachMaster(ctx, each)
	case *goredis.Client:
		err = each(ctx, c)
	}
	if err != nil {
		return int(moved.Load()), fmt.Errorf("redis key migration: %w", err)
	}
	return int(moved.Load()), nil
}

// migrateInBackground runs MigrateKeys once, logging what it did.
func (s *Store) migrateInBackground() {
	s.probes.Add(1)
	go func() {
		defer s.probes.Done()
		start := time.Now()
		n, err := s.MigrateKeys(s.life)
		switch {
		case err != nil && s.life.Err() == nil:
			s.log.Warn("keys of an earlier shape not all migrated; the next start tries again", "migrated", n, "err", err)
		case n > 0:
			s.log.Info("migrated keys of an earlier shape", "keys", n, "took", time.Since(start).Round(time.Millisecond))
		}
	}()
}
