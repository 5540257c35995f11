module github.com/policyd-mail/policyd

go 1.26
