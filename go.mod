module github.com/policyd-mail/policyd

go 1.26

require (
	github.com/emersion/go-message v0.18.2 // indirect
	github.com/emersion/go-milter v0.5.0 // indirect
)
