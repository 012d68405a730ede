module novasandbox/spike/goagent

go 1.19
